"""Judges: score (prompt, completion) pairs for online DPO and the held-out evaluation.

    Judge                                  the interface: score(prompts, completions) -> list[float]
    load_function_judge("pkg.mod:fn")      import a Python judge (fn(prompt, completion) -> float)
    FunctionJudge(fn_or_spec)              a function judge, run in the process that scores
    RewardModelJudge(model_path=, ...)     AutoModelForSequenceClassification (num_labels=1) in
                                           its own Ray actors, one role: scoring
    register_judge(name, config_field=) / JUDGES / judge_kinds() / configured_judges(config)
    build_judge(config: JudgeConfig)        the one judge the config sets

``prompt`` is whatever the data set row holds (a string, or a list of chat messages);
``completion`` is the decoded completion text. A score is a finite real number, higher is
better; only differences between scores of one prompt's candidates matter to pairing.

This module imports neither ray nor torch at the top: a function judge (and the unit tests)
stays light, and the reward-model parts import them where they run.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import math
import numbers
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence, Union

from ray_dpo.config import JudgeConfig
from ray_dpo.dtypes import torch_dtype
from ray_dpo.registry import Registry
from ray_dpo.resources import actor_options

FUNCTION_KEY = "online.judge.function"
REWARD_MODEL_KEY = "online.judge.reward_model"

JudgeFn = Callable[[Any, str], float]


class JudgeError(ValueError):
    """A judge cannot be built or returned something that is not a score."""


class Judge(Protocol):
    name: str

    def score(self, prompts: Sequence[Any], completions: Sequence[str]) -> list[float]:
        """One score per (prompts[i], completions[i]); same length and order as the inputs."""

    def shutdown(self) -> None:
        """Free the judge's actors (no-op for local judges)."""


# --------------------------------------------------------------------------- function judges


def _moved_module(module_name: str) -> Optional[str]:
    """The new name of a ray_dpo.online module that moved to ray_dpo.engines (the judges and
    the sentiment example's judge did), or None."""
    prefix = "ray_dpo.online."
    if not module_name.startswith(prefix):
        return None
    candidate = "ray_dpo.engines." + module_name[len(prefix):]
    return candidate if importlib.util.find_spec(candidate) is not None else None


def load_function_judge(spec: str, *, key: str = FUNCTION_KEY) -> JudgeFn:
    """Import ``"package.module:function"`` and return the function.

    Raises JudgeError naming ``key`` (the config key the spec came from) when the spec is
    malformed, the module cannot be imported, the attribute is missing, or it is not callable.
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise JudgeError(f"{key}: got {spec!r}, expected 'package.module:function' "
                         "(e.g. ray_dpo.testing.assets:judge_score)")
    module_name, attr = (part.strip() for part in spec.split(":"))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name != err.name and not module_name.startswith(err.name + "."):
            # The judge's module exists but one of ITS imports does not.
            raise JudgeError(f"{key}: importing module {module_name!r} failed: it needs {err.name!r}, "
                             "which is not installed here (add it to the image or the job's "
                             "runtime_env pip list)") from err
        moved = _moved_module(module_name)
        if moved:
            raise JudgeError(f"{key}: module {module_name!r} has moved to {moved!r}; set "
                             f"{key}: {moved}:{attr}") from err
        raise JudgeError(f"{key}: module {module_name!r} not found (ModuleNotFoundError: {err}). "
                         "Install the package, or put the module in the job's working_dir "
                         "(ray job submit --working-dir) so every node can import it") from err
    except Exception as err:  # the user's module raised at import time
        raise JudgeError(f"{key}: importing module {module_name!r} raised "
                         f"{type(err).__name__}: {err}") from err
    obj = module
    for part in attr.split("."):  # "module:Class.method" works too
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise JudgeError(f"{key}: module {module_name!r} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise JudgeError(f"{key}: {spec!r} is a {type(obj).__name__}, not a function; it must be "
                         "callable as fn(prompt, completion) -> float")
    return obj


def check_scores(scores: Any, n: int, *, name: str) -> list[float]:
    """Scores as a list of n finite floats; JudgeError saying which one is wrong otherwise."""
    try:
        scores = list(scores)
    except TypeError:
        raise JudgeError(f"judge {name} returned {type(scores).__name__}, expected a list of scores") from None
    if len(scores) != n:
        raise JudgeError(f"judge {name} returned {len(scores)} scores for {n} completions")
    out = []
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(float(s)):
            raise JudgeError(f"judge {name} returned {s!r} ({type(s).__name__}) for completion {i}; "
                             "a score must be a finite number")
        out.append(float(s))
    return out


def score_with_function(fn: JudgeFn, prompts: Sequence[Any], completions: Sequence[str],
                        *, name: str = "<function>") -> list[float]:
    """Call ``fn(prompt, completion)`` on each pair and check the results."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    scores = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        try:
            scores.append(fn(p, c))
        except Exception as err:
            raise JudgeError(f"judge {name} raised {type(err).__name__} on completion {i} "
                             f"(completion {c[:60]!r}): {err}") from err
    return check_scores(scores, len(prompts), name=name)


class FunctionJudge:
    """A Python judge ``fn(prompt, completion) -> float``, called in this process (the
    follower's, next to the engines' answers): a callable, or an import spec
    "package.module:function", imported now so a bad spec fails when the run starts."""

    def __init__(self, function: Union[str, JudgeFn]):
        self._fn = load_function_judge(function) if isinstance(function, str) else function
        if not callable(self._fn):
            raise JudgeError(f"a function judge must be callable, got {type(function).__name__}")
        self.name = _name(function)

    def score(self, prompts: Sequence[Any], completions: Sequence[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        return score_with_function(self._fn, prompts, completions, name=self.name)

    def shutdown(self) -> None:
        pass


def _name(fn_or_spec: Union[str, JudgeFn]) -> str:
    if isinstance(fn_or_spec, str):
        return fn_or_spec
    return f"{getattr(fn_or_spec, '__module__', '?')}:{getattr(fn_or_spec, '__qualname__', repr(fn_or_spec))}"


def _bounds(total: int, size: int) -> list[tuple[int, int]]:
    """[lo, hi) chunks of at most ``size`` items."""
    return [(lo, min(lo + size, total)) for lo in range(0, total, size)]


# --------------------------------------------------------------------------- reward model


def reward_model_text(tokenizer: Any, prompt: Any, completion: str) -> str:
    """The text a sequence-classification reward model scores for (prompt, completion).

    With a chat template: the conversation [user prompt (or the prompt's messages),
    assistant completion] rendered by the reward model's own template, since reward models
    are trained on their template. Without one: prompt and completion on separate lines.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        messages.append({"role": "assistant", "content": completion})
        return tokenizer.apply_chat_template(messages, tokenize=False)
    if isinstance(prompt, list):
        prompt = "\n".join(m.get("content", "") for m in prompt)
    return f"{prompt}\n{completion}"


class RewardModelActor:
    """One role: a frozen AutoModelForSequenceClassification (num_labels=1) that scores texts.

    model_path: HF directory. dtype: "fp32" | "bf16" | "fp16". device: "cpu" | "cuda".
    batch_size: texts per forward. max_length: tokens kept per text (cut on the LEFT, so
    the completion, which the score is about, survives).
    """

    def __init__(self, model_path: str, *, dtype: str = "fp32", device: str = "cpu", batch_size: int = 16,
                 max_length: int = 2048):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.device = torch.device("cuda" if device == "cuda" and torch.cuda.is_available() else "cpu")
        self.model = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=torch_dtype(dtype))
        if self.model.config.num_labels != 1:
            raise JudgeError(f"{REWARD_MODEL_KEY}: {model_path} has num_labels="
                             f"{self.model.config.num_labels}; a reward model must output one score "
                             "(num_labels=1)")
        self.model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.truncation_side = "left"
        self.tokenizer.padding_side = "right"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            # Sequence classifiers read the last non-pad token; they need to know the pad id.
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.max_length = max_length

    def score(self, prompts: list, completions: list[str]) -> list[float]:
        import torch

        texts = [reward_model_text(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        scores: list[float] = []
        with torch.inference_mode():
            for lo, hi in _bounds(len(texts), self.batch_size):
                enc = self.tokenizer(texts[lo:hi], return_tensors="pt", padding=True, truncation=True,
                                     max_length=self.max_length, add_special_tokens=False)
                logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
                scores.extend(logits[:, 0].float().tolist())
        return scores

    def ping(self) -> bool:
        return True


def reward_model_actor_options(config: JudgeConfig, *, use_gpu: bool,
                               num_cpus_per_actor: float | None = None) -> dict[str, Any]:
    """The ``.options()`` of each reward-model actor: CPUs, GPUs, custom resources, env.

    num_cpus_per_actor: None takes online.judge.num_cpus_per_actor. online.judge.resources
    (e.g. {judge_node: 0.01}) pins the actors to the nodes that advertise them.
    """
    return actor_options(
        num_cpus=config.num_cpus_per_actor if num_cpus_per_actor is None else num_cpus_per_actor,
        num_gpus=config.num_gpus_per_actor, resources=config.resources, use_gpu=use_gpu,
        env_vars={"TOKENIZERS_PARALLELISM": "false"},
    )


class RewardModelJudge:
    """``config.num_actors`` RewardModelActors behind one ordered score().

    model_path: the reward model directory (online.judge.reward_model). config: JudgeConfig
    (num_actors, num_cpus_per_actor, num_gpus_per_actor, resources). use_gpu: actors on cuda
    with num_gpus_per_actor GPUs each (1 if 0); else CPU. num_cpus_per_actor: overrides the
    config's (None: online.judge.num_cpus_per_actor). Pairs are split into contiguous
    near-equal chunks, one per actor.
    """

    def __init__(self, *, model_path: str, config: JudgeConfig, use_gpu: bool = False, dtype: str = "fp32",
                 num_cpus_per_actor: float | None = None, batch_size: int = 16, max_length: int = 2048,
                 start_timeout_s: float = 600.0):
        import ray

        if config.num_actors < 1:
            raise JudgeError(f"online.judge.num_actors must be >= 1, got {config.num_actors}")
        self.name = f"reward_model:{model_path}"
        cls = ray.remote(RewardModelActor).options(
            **reward_model_actor_options(config, use_gpu=use_gpu, num_cpus_per_actor=num_cpus_per_actor))
        self._actors = [cls.remote(model_path, dtype=dtype, device="cuda" if use_gpu else "cpu",
                                   batch_size=batch_size, max_length=max_length)
                        for _ in range(config.num_actors)]
        t0 = time.perf_counter()
        try:
            ray.get([a.ping.remote() for a in self._actors], timeout=start_timeout_s)
        except ray.exceptions.RayActorError as err:
            self.shutdown()
            cause = getattr(err, "cause", None) or err
            if isinstance(getattr(cause, "cause", None), JudgeError):
                cause = cause.cause
            raise JudgeError(f"{REWARD_MODEL_KEY}: the reward-model actors failed to start: {cause}") from err
        self.start_seconds = time.perf_counter() - t0

    @property
    def num_actors(self) -> int:
        return len(self._actors)

    def score(self, prompts: Sequence[Any], completions: Sequence[str]) -> list[float]:
        import ray

        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        n = len(prompts)
        base, extra = divmod(n, self.num_actors)
        refs, lo = [], 0
        for i, actor in enumerate(self._actors):
            hi = lo + base + (1 if i < extra else 0)
            if hi > lo:
                refs.append(actor.score.remote(list(prompts[lo:hi]), list(completions[lo:hi])))
            lo = hi
        scores = [s for chunk in ray.get(refs) for s in chunk]
        return check_scores(scores, n, name=self.name)

    def shutdown(self) -> None:
        import ray

        for a in self._actors:
            ray.kill(a)
        self._actors = []


# --------------------------------------------------------------------------- registry


JudgeBuilder = Callable[..., Judge]


@dataclass(frozen=True)
class JudgeSpec:
    """A registered judge: ``build(config: JudgeConfig, *, use_gpu, dtype) -> Judge``,
    chosen when the JudgeConfig field ``config_field`` is set."""

    name: str
    build: JudgeBuilder
    config_field: str


JUDGES: Registry[JudgeSpec] = Registry("judge")
"""Every kind of judge; a config sets the config_field of exactly one."""


def register_judge(name: str, *, config_field: str) -> Callable[[JudgeBuilder], JudgeBuilder]:
    """Register ``builder(config: JudgeConfig, *, use_gpu, dtype) -> Judge``, chosen when
    the JudgeConfig field ``config_field`` is set."""

    def deco(builder: JudgeBuilder) -> JudgeBuilder:
        JUDGES.add(name, JudgeSpec(name, builder, config_field))
        return builder

    return deco


def judge_kinds() -> list[str]:
    """Sorted names of the registered judges."""
    return JUDGES.names()


def configured_judges(config: JudgeConfig) -> list[str]:
    """Sorted names of the judges whose config field ``config`` sets (a valid config: one)."""
    return [name for name in JUDGES.names() if getattr(config, JUDGES[name].config_field, None)]


@register_judge("function", config_field="function")
def _build_function(config: JudgeConfig, **_: Any) -> Judge:
    return FunctionJudge(config.function)


@register_judge("reward_model", config_field="reward_model")
def _build_reward_model(config: JudgeConfig, *, use_gpu: bool = False, dtype: str = "fp32", **_: Any) -> Judge:
    return RewardModelJudge(model_path=config.reward_model, config=config, use_gpu=use_gpu, dtype=dtype)


def build_judge(config: JudgeConfig, *, use_gpu: bool = False, dtype: str = "fp32") -> Judge:
    """The judge the config names: exactly one of online.judge.function / .reward_model is set.

    A function judge scores in the calling process; a reward model in its own actors
    (use_gpu / dtype are theirs).
    """
    chosen = configured_judges(config)
    fields = ", ".join(sorted(f"online.judge.{JUDGES[name].config_field}" for name in JUDGES))
    if not chosen:
        raise JudgeError(f"online.judge: no judge configured; set one of {fields}")
    if len(chosen) > 1:
        raise JudgeError(f"online.judge: set only one of {fields}, got {', '.join(chosen)}")
    return JUDGES[chosen[0]].build(config, use_gpu=use_gpu, dtype=dtype)
