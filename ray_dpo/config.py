"""Run configuration: typed dataclasses loaded from one YAML file.

A run is described by a YAML file whose top-level sections map onto the dataclasses
below. Every field is documented where it is declared. Loading goes

    YAML (yaml.safe_load) -> apply ``--set a.b=c`` overrides -> build dataclasses
    -> check every field -> RunConfig, or one ConfigError listing every problem

so a user fixes a config in one round trip instead of one error at a time.

This module is pure: it imports neither ray, deepspeed nor vllm.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import importlib.machinery
import importlib.util
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml

from ray_dpo.data.chat_template import is_inline_template, template_problem
from ray_dpo.loss_rules import loss_problems, needs_reference
from ray_dpo.losses import loss_names

REMOTE_PREFIXES = ("s3://", "gs://", "gcs://", "hf://", "http://", "https://", "abfs://")


# --------------------------------------------------------------------------- sections


@dataclass
class RunSection:
    name: str = "ray-dpo"
    """Run name. Running the same name with the same storage_path again resumes it."""
    storage_path: str = "./ray_dpo_runs"
    """Where checkpoints, the reference cache and the default MLflow store live.
    Must be shared storage (NFS, s3://, gs://) on a multi-node cluster."""
    seed: int = 0
    """Seed for data shuffling and model initialisation noise."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto picks cuda+nccl when the cluster has GPUs, else cpu+gloo."""
    local_num_cpus: Optional[int] = None
    """Logical CPUs for a local Ray cluster started by ray-dpo (ignored when RAY_ADDRESS
    is set). Default: max(4, cores, what the config's actors hold at once + 1), so data
    tasks and actors never starve behind train workers (local_cpus_needed below)."""


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """Hugging Face model directory (or hub id on clusters that may download)."""
    tokenizer: Optional[str] = None
    """Tokenizer directory; defaults to name_or_path."""
    dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Training dtype of the policy (and of the reference unless it says otherwise)."""
    chat_template: Optional[str] = None
    """Chat template replacing the tokenizer's own: the path of a Jinja file, or the template
    itself inline (any value containing "{%" or "{{", e.g. a YAML block scalar or
    --set "model.chat_template={% for m in messages %}..."). Used to build the pairs, to
    sample online / held-out prompts, and written into the exported hf_model/ tokenizer
    (chat_template.jinja and tokenizer_config.json), so the model serves with the template
    it was trained with."""
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: Optional[str] = None
    """Passed to from_pretrained, e.g. "sdpa" or "flash_attention_2" (GPU only)."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """JSONL / Parquet shards: files, directories or globs; local or s3:// / gs://."""
    eval_files: list[str] = field(default_factory=list)
    """Optional held-out preference pairs, same formats."""
    format: Literal["auto", "standard", "conversational", "sharegpt", "implicit", "unpaired",
                    "sharegpt_kto"] = "auto"
    """Row format; auto detects it per row. unpaired (TRL: prompt, completion, label) and
    sharegpt_kto (LLaMA-Factory: messages + kto_tag) are labelled examples for loss.type=kto."""
    unpair: bool = False
    """Unpaired losses (kto) only: each preference pair becomes two examples, chosen
    desirable and rejected undesirable (counted as two rows in the data report)."""
    max_length: int = 1024
    """Maximum tokens of prompt + one response."""
    max_prompt_length: int = 512
    """Maximum prompt tokens."""
    over_length: Literal["truncate_prompt", "truncate_response", "drop"] = "truncate_prompt"
    """A pair over the limits is counted (per cause, in the data report) and:
    truncate_prompt shortens the prompt, then cuts responses from the right. Chat prompts
    lose whole earliest turns first (a leading system message stays, the kept part starts
    at a user turn, every message keeps its role header); only when the last user turn
    alone is too long is that message cut inside its content, keeping its end; a pair whose
    system prompt + headers cannot fit is dropped. Text prompts keep their last
    max_prompt_length tokens (a BOS the tokenizer adds stays in front).
    truncate_response never cuts the prompt (a prompt over max_prompt_length drops the
    pair) and cuts responses to fit; drop drops the pair."""
    on_bad_row: Literal["error", "skip"] = "error"
    """error: stop at the first malformed row, naming file and line; skip: count it."""
    shuffle: bool = True
    """Shuffle pairs each epoch (seeded by run.seed and the epoch)."""


@dataclass
class LossConfig:
    type: str = "sigmoid"
    """Loss from ray_dpo.losses: sigmoid, robust, hinge, ipo (pairs + reference), simpo, orpo
    (pairs, no reference: none is started) or kto (unpaired examples + reference); the
    README's loss table lists what each needs and reads."""
    beta: float = 0.1
    """Strength of the KL constraint to the reference (> 0); SimPO: reward scale of the mean
    token log-prob (the paper uses 2-10); ORPO: the weight λ of the odds-ratio term (as TRL)."""
    label_smoothing: float = 0.0
    """Assumed label-noise rate for cDPO (sigmoid), robust DPO and SimPO, in [0, 0.5)."""
    sft_weight: float = 0.0
    """Weight of an extra NLL term on the chosen response (0 disables; ORPO has its own)."""
    length_normalize: bool = False
    """DPO family: divide sequence log-probs by response length before forming the logits."""
    gamma: Optional[float] = None
    """SimPO only: target reward margin γ, absolute (the paper's γ/β ratio times beta);
    unset: 0.5, TRL's simpo_gamma."""
    desirable_weight: Optional[float] = None
    """KTO only: λ_D, weight of desirable examples (unset: 1.0)."""
    undesirable_weight: Optional[float] = None
    """KTO only: λ_U, weight of undesirable examples (unset: 1.0). The KTO paper advises
    λ_D n_D / (λ_U n_U) in [1, 4/3] for n_D desirable and n_U undesirable examples."""


@dataclass
class ReferenceConfig:
    model: Optional[str] = None
    """Reference model directory; default: the policy's initial weights (model.name_or_path)."""
    num_actors: int = 1
    """Long-lived actors that each hold a frozen copy of the reference model."""
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources per actor, e.g. {reference_node: 0.01} to pin them to nodes."""
    batch_size: int = 8
    """Pairs per log-prob call."""
    max_in_flight: int = 2
    """Batches queued per actor; bounds memory while keeping actors busy."""
    precompute: bool = False
    """Score the whole data set once before training and cache it on storage."""
    cache_dir: Optional[str] = None
    """Where precomputed log-probs go; default: <storage_path>/reference_cache."""
    max_restarts: int = 3
    """How often a dead reference actor is restarted before the run fails."""
    layout: Literal["padded", "packed", "prefix_shared"] = "padded"
    """Batch layout of the reference forward (see policy.layout): same log-probs, fewer
    computed positions. prefix_shared needs model.attn_implementation sdpa or eager."""
    max_tokens_per_row: Optional[int] = None
    """packed / prefix_shared: row capacity in tokens (None: one row per forward, no padding).
    sdpa/eager compute dense rows x T x T attention, so keep rows to a few thousand tokens."""


@dataclass
class PolicyConfig:
    num_workers: int = 1
    """Ray Train workers, each one DeepSpeed engine (one per GPU on a GPU cluster)."""
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    """Used only when the run uses GPUs."""
    resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources per worker, e.g. {policy_node: 0.01}."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3."""
    micro_batch_size: int = 4
    """Pairs per worker per forward/backward."""
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 disables)."""
    num_epochs: int = 1
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (default: num_epochs over the data)."""
    checkpoint_every_steps: int = 0
    """Save a resumable checkpoint every N optimizer steps (0: only at the end)."""
    num_checkpoints_to_keep: int = 2
    """Checkpoints kept on storage (>= 1); older ones are deleted as new ones are written.
    Keep 2 or more: resume falls back to the previous checkpoint when the latest is incomplete."""
    max_failures: int = 3
    """Times the policy worker group is restarted from the latest checkpoint inside the same
    run when a worker dies (process killed, node lost, an error in the training loop); the
    BatchFeeder actor is restarted up to this many times too. 0: the first failure ends the
    run (run the same command again to resume). Node preemptions Ray sees coming (drains)
    are not counted."""
    sigterm_grace_s: float = 0.0
    """A policy worker sent SIGTERM (what Kubernetes sends before evicting a pod, SIGKILL
    following after terminationGracePeriodSeconds, 30 s by default) finishes its step, the
    group saves a checkpoint, then it exits, if that takes at most this many seconds; the
    restarted group then loses no step. 0: SIGTERM kills at once (back to the last
    checkpoint). Keep it below the pod's grace period minus a checkpoint's write time.
    Off by default: not yet measured, and surviving ranks of a group Ray Train stops after a
    failure would also wait it out before exiting."""
    save_hf_model: bool = True
    """Save the final policy in Hugging Face format (loadable by from_pretrained / vLLM)."""
    offload_optimizer: bool = False
    """ZeRO optimizer-state offload to CPU (GPU runs)."""
    layout: Literal["padded", "packed", "prefix_shared"] = "padded"
    """How a micro-batch's chosen+rejected sequences become model rows (ray_dpo.packing):
    padded: prompt+chosen and prompt+rejected rows, right-padded (the classic layout).
    packed: the same sequences concatenated into rows without padding, position ids
        restarting per sequence, attention kept inside each sequence (flash varlen on GPU,
        a 4D mask with sdpa/eager).
    prefix_shared: prompt, chosen, rejected in one sequence; rejected sees the prompt but
        not chosen, so the prompt is computed once per pair instead of twice. Needs
        model.attn_implementation "sdpa" or "eager" (a 4D mask; flash attention takes none).
    All three give the same log-probs (to float rounding). Only models whose positions come
    from position_ids (RoPE, learned absolute) can use packed / prefix_shared; a custom mask
    also bypasses sliding-window attention (see ray_dpo/packing.py)."""
    max_tokens_per_micro_batch: Optional[int] = None
    """Token budget per forward (packed / prefix_shared: its tokens, so with one row per
    forward it also bounds sdpa/eager's dense T x T attention; padded: rows x T).
    The pairs of each of the gradient_accumulation_steps micro-batches are split into
    consecutive forwards of at most this many computed positions (a longer pair gets a
    forward of its own), and their gradients accumulate before the optimizer step, so the
    update is unchanged. None: one forward per micro-batch."""
    max_tokens_per_row: Optional[int] = None
    """packed / prefix_shared: row capacity in tokens (first-fit decreasing; a longer
    sequence gets a row of its own). None: one row per forward, no padding at all: the
    right choice for flash_attention_2 (varlen kernels skip cross-sequence blocks). sdpa /
    eager compute the dense T x T attention of each row, so on long data rows of ~1k tokens
    are faster despite some tail padding (see BENCHMARKS.md)."""


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128


@dataclass
class JudgeConfig:
    function: Optional[str] = None
    """Python judge as "package.module:function" taking (prompt, completion) -> float."""
    reward_model: Optional[str] = None
    """Sequence-classification reward model directory, served by its own actors."""
    num_actors: int = 1
    """Reward-model actors (online.judge.reward_model only; a function judge has none)."""
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources per reward-model actor, e.g. {judge_node: 0.01} to pin them to nodes."""


@dataclass
class OnlineConfig:
    enabled: bool = False
    """Online (iterative) DPO: the policy's own samples become new pairs each round."""
    rounds: int = 2
    """Rounds in one training run: generate -> judge -> pairs -> train, policy never restarted."""
    prompts_per_round: int = 64
    """Data set prompts sampled per round; a round trains ceil(prompts_per_round / global
    batch) * policy.num_epochs steps (fewer pairs than prompts: the rest are empty steps)."""
    samples_per_prompt: int = 4
    backend: Literal["vllm", "transformers"] = "vllm"
    """Generation engines for online rounds and for eval.prompts_file sampling (offline too)."""
    num_engines: int = 1
    num_cpus_per_engine: float = 1.0
    gpus_per_engine: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    """Extra Ray resources per generation engine, e.g. {generation_node: 0.01} to pin them to nodes."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    pair_strategy: Literal["regenerate_rejected", "best_vs_worst"] = "regenerate_rejected"
    weight_sync: Literal["object_store", "nccl", "checkpoint"] = "object_store"
    """object_store: one ray.put of the gathered state dict (default, any device);
    checkpoint: a safetensors directory under <storage_path>/<run.name>/weight_sync."""
    sync_tolerance: float = 1e-3
    """Largest allowed |log-prob| difference between engine and policy after a sync."""
    overlap: bool = False
    """Generate round r+1 while round r trains (one round of staleness)."""


@dataclass
class MLflowConfig:
    tracking_uri: Optional[str] = None
    """Default: $MLFLOW_TRACKING_URI, else an embedded SQLite store <storage_path>/mlflow.db
    shared by every run of that storage path (so offline and online runs compare)."""
    experiment: str = "ray_dpo"
    run_name: Optional[str] = None
    """Default: run.name."""
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class TrackingConfig:
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    log_every_steps: int = 1
    progress: bool = True
    """Print a progress line (step/total, loss, tokens/s, ETA) on the driver."""


@dataclass
class EvalConfig:
    every_steps: int = 0
    """Evaluate on data.eval_files every N optimizer steps (0: only at the end)."""
    max_pairs: Optional[int] = None
    """Cap on eval pairs (default: all)."""
    prompts_file: Optional[str] = None
    """Held-out prompts (JSONL with "prompt", or one per line) sampled from the policy at
    step 0, every every_steps and at the end; scored by online.judge (eval/judge_score) and
    KL to the reference (eval/kl). Offline and online runs alike, so they compare."""
    num_prompts: int = 32
    samples_per_prompt: int = 4


@dataclass
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> str:
        """<storage_path>/<run.name>: checkpoints, reports, the default MLflow store."""
        return join_path(self.run.storage_path, self.run.name)


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class Problem:
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


class ConfigError(ValueError):
    """Every problem found in a config, each with its key path and how to fix it."""

    def __init__(self, problems: list[Problem], source: str = "config"):
        self.problems = list(problems)
        lines = [f"{source}: {len(self.problems)} problem(s):"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"a mapping of {_type_name(k)} to {_type_name(v)}"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(value: Any, tp: Any, key: str, problems: list[Problem]) -> Any:
    """Convert a YAML value to ``tp``; on failure record a Problem and return None."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()
        return _build(tp, value, key, problems)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key, problems)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        problems.append(Problem(key, f"got {value!r}, expected {_type_name(tp)}{extra}"))
        return None
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single file is a one-element list
        if not isinstance(value, list):
            problems.append(Problem(key, f"got {value!r}, expected {_type_name(tp)}"))
            return None
        return [_convert(v, item_tp, f"{key}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            problems.append(Problem(key, f"got {value!r}, expected {_type_name(tp)}"))
            return None
        return {
            _convert(k, k_tp, f"{key}.{k}", problems): _convert(v, v_tp, f"{key}.{k}", problems)
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    problems.append(Problem(key, f"got {value!r} ({type(value).__name__}), expected {_type_name(tp)}"))
    return None


def _build(cls: type, data: Any, prefix: str, problems: list[Problem]) -> Any:
    if not isinstance(data, dict):
        problems.append(Problem(prefix or "<top>", f"expected a mapping, got {type(data).__name__}"))
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else "valid keys: " + ", ".join(names)
            problems.append(Problem(path, f"unknown key ({hint})"))
            continue
        converted = _convert(value, hints[key], path, problems)
        if converted is not None or value is None:
            kwargs[key] = converted
    return cls(**{k: v for k, v in kwargs.items() if v is not None or _is_optional(hints[k])})


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


# --------------------------------------------------------------------------- overrides


def _override_value(raw: str) -> Any:
    """A ``--set`` value: YAML (numbers, booleans, null, lists) when it parses as YAML,
    else the text itself, so inline Jinja ("{% if x %}...") or other text with YAML syntax
    characters arrives as a string instead of a parser traceback."""
    if not raw.strip():
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides; values are parsed as YAML scalars/lists, and a
    value that is not valid YAML is taken as a plain string."""
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(Problem(item, "override must look like section.key=value"))
            continue
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = data
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                problems.append(Problem(dotted, f"{part!r} is not a section"))
                break
        else:
            node[parts[-1]] = _override_value(raw)
    if problems:
        raise ConfigError(problems, source="--set")
    return data


# --------------------------------------------------------------------------- checks


def _is_remote(path: str) -> bool:
    return path.startswith(REMOTE_PREFIXES)


def join_path(base: str, *parts: str) -> str:
    """Join a local path or an object-store URI."""
    if _is_remote(base):
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.path.exists(path)


def _check_files(key: str, patterns: list[str], problems: list[Problem]) -> None:
    for i, pattern in enumerate(patterns):
        if _is_remote(pattern):
            continue
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            if not glob.glob(expanded):
                problems.append(Problem(f"{key}[{i}]", f"glob {pattern!r} matches no file"))
        elif not os.path.exists(expanded):
            problems.append(Problem(f"{key}[{i}]", f"no such file or directory: {pattern!r}"))


def _positive(problems, key, value, *, allow_zero=False):
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        problems.append(Problem(key, f"must be {bound}, got {value}"))


def check(cfg: RunConfig, *, check_files: bool = True) -> list[Problem]:
    """Range and consistency checks on a built config; returns every problem found."""
    p: list[Problem] = []
    _check_required_and_ranges(cfg, p)
    _check_consistency(cfg, p)
    problem = template_problem(cfg.model.chat_template, check_files=check_files)
    if problem is not None:
        p.append(Problem("model.chat_template", problem))
    if check_files:
        _check_local_files(cfg, p)
    return p


def _check_required_and_ranges(cfg: RunConfig, p: list[Problem]) -> None:
    if not cfg.run.name or "/" in cfg.run.name or "\\" in cfg.run.name or cfg.run.name.strip(".") == "" \
            or ".." in cfg.run.name:
        p.append(Problem("run.name", f"must be a non-empty name without '/', '\\' or '..' (it names a "
                                     f"directory under run.storage_path), got {cfg.run.name!r}"))
    if not cfg.model.name_or_path:
        p.append(Problem("model.name_or_path", "is required: a model directory or hub id"))
    if not cfg.data.train_files:
        p.append(Problem("data.train_files", "is required: JSONL/Parquet files, directories or globs"))
    for key, value in [
        ("data.max_length", cfg.data.max_length),
        ("data.max_prompt_length", cfg.data.max_prompt_length),
        ("loss.beta", cfg.loss.beta),
        ("reference.num_actors", cfg.reference.num_actors),
        ("reference.batch_size", cfg.reference.batch_size),
        ("reference.max_in_flight", cfg.reference.max_in_flight),
        ("policy.num_workers", cfg.policy.num_workers),
        ("policy.micro_batch_size", cfg.policy.micro_batch_size),
        ("policy.gradient_accumulation_steps", cfg.policy.gradient_accumulation_steps),
        ("policy.learning_rate", cfg.policy.learning_rate),
        ("policy.num_epochs", cfg.policy.num_epochs),
        ("policy.max_steps", cfg.policy.max_steps),
        ("policy.num_checkpoints_to_keep", cfg.policy.num_checkpoints_to_keep),
        ("policy.max_tokens_per_micro_batch", cfg.policy.max_tokens_per_micro_batch),
        ("reference.max_tokens_per_row", cfg.reference.max_tokens_per_row),
        ("policy.max_tokens_per_row", cfg.policy.max_tokens_per_row),
        ("tracking.log_every_steps", cfg.tracking.log_every_steps),
        ("online.rounds", cfg.online.rounds),
        ("online.prompts_per_round", cfg.online.prompts_per_round),
        ("online.samples_per_prompt", cfg.online.samples_per_prompt),
        ("online.sampling.max_new_tokens", cfg.online.sampling.max_new_tokens),
        ("online.sync_tolerance", cfg.online.sync_tolerance),
        ("eval.num_prompts", cfg.eval.num_prompts),
        ("eval.samples_per_prompt", cfg.eval.samples_per_prompt),
    ]:
        _positive(p, key, value)
    for key, value in [
        ("loss.sft_weight", cfg.loss.sft_weight),
        ("policy.weight_decay", cfg.policy.weight_decay),
        ("policy.warmup_steps", cfg.policy.warmup_steps),
        ("policy.max_grad_norm", cfg.policy.max_grad_norm),
        ("policy.checkpoint_every_steps", cfg.policy.checkpoint_every_steps),
        ("reference.num_cpus_per_actor", cfg.reference.num_cpus_per_actor),
        ("reference.num_gpus_per_actor", cfg.reference.num_gpus_per_actor),
        ("reference.max_restarts", cfg.reference.max_restarts),
        ("policy.max_failures", cfg.policy.max_failures),
        ("policy.sigterm_grace_s", cfg.policy.sigterm_grace_s),
        ("policy.cpus_per_worker", cfg.policy.cpus_per_worker),
        ("policy.gpus_per_worker", cfg.policy.gpus_per_worker),
        ("eval.every_steps", cfg.eval.every_steps),
        ("online.sampling.temperature", cfg.online.sampling.temperature),
        ("online.num_cpus_per_engine", cfg.online.num_cpus_per_engine),
        ("online.judge.num_cpus_per_actor", cfg.online.judge.num_cpus_per_actor),
    ]:
        _positive(p, key, value, allow_zero=True)
    _check_resources(cfg, p)


def _check_resources(cfg: RunConfig, p: list[Problem]) -> None:
    """Custom Ray resources of the online sections: non-negative, never CPU or GPU."""
    for section, resources, own_keys in (
        ("online", cfg.online.resources, {"CPU": "num_cpus_per_engine", "GPU": "gpus_per_engine"}),
        ("online.judge", cfg.online.judge.resources, {"CPU": "num_cpus_per_actor", "GPU": "num_gpus_per_actor"}),
    ):
        for name, amount in (resources or {}).items():
            key = f"{section}.resources.{name}"
            if name in own_keys:  # Ray refuses CPU / GPU in resources=
                p.append(Problem(key, f"set {section}.{own_keys[name]} instead; resources holds custom "
                                      "Ray resources only (e.g. {generation_node: 0.01})"))
            _positive(p, key, amount, allow_zero=True)


def _check_consistency(cfg: RunConfig, p: list[Problem]) -> None:
    if cfg.data.max_prompt_length >= cfg.data.max_length > 0:
        p.append(Problem("data.max_prompt_length",
                         f"must be < data.max_length ({cfg.data.max_length}) to leave room for responses"))
    if cfg.loss.type not in loss_names():
        hint = difflib.get_close_matches(cfg.loss.type, loss_names(), n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        p.append(Problem("loss.type", f"unknown loss {cfg.loss.type!r}{extra}; valid: {', '.join(loss_names())}"))
    if not 0.0 <= cfg.loss.label_smoothing < 0.5:
        p.append(Problem("loss.label_smoothing", f"must be in [0, 0.5), got {cfg.loss.label_smoothing}"))
    p.extend(Problem(key, message) for key, message in loss_problems(cfg))
    if cfg.policy.zero_stage not in (0, 1, 2, 3):
        p.append(Problem("policy.zero_stage", f"must be 0, 1, 2 or 3, got {cfg.policy.zero_stage}"))
    if len(cfg.policy.adam_betas) != 2 or not all(0 <= b < 1 for b in cfg.policy.adam_betas if b is not None):
        p.append(Problem("policy.adam_betas", f"must be two numbers in [0, 1), got {cfg.policy.adam_betas}"))
    attn = cfg.model.attn_implementation
    for key, layout in (("policy.layout", cfg.policy.layout), ("reference.layout", cfg.reference.layout)):
        if layout == "prefix_shared" and attn and attn not in ("sdpa", "eager"):
            p.append(Problem(key, f"prefix_shared needs a 4D attention mask, which model.attn_implementation="
                                  f"{attn!r} does not take; set it to 'sdpa' or 'eager', or use layout 'packed'"))
    if not 0 < cfg.online.sampling.top_p <= 1:
        p.append(Problem("online.sampling.top_p", f"must be in (0, 1], got {cfg.online.sampling.top_p}"))
    if cfg.online.enabled and not (cfg.online.judge.function or cfg.online.judge.reward_model):
        p.append(Problem("online.judge", "online DPO needs a judge: set online.judge.function "
                                         "(package.module:function) or online.judge.reward_model"))
    if cfg.eval.prompts_file and not (cfg.online.judge.function or cfg.online.judge.reward_model):
        p.append(Problem("eval.prompts_file", "held-out samples are scored by online.judge: set "
                                              "online.judge.function or online.judge.reward_model"))
    if cfg.online.judge.function and cfg.online.judge.reward_model:
        p.append(Problem("online.judge", "set only one of online.judge.function and online.judge.reward_model"))
    if cfg.online.enabled and cfg.online.pair_strategy == "best_vs_worst" and cfg.online.samples_per_prompt < 2:
        p.append(Problem("online.samples_per_prompt", "best_vs_worst compares samples: needs >= 2"))
    if cfg.online.enabled and cfg.reference.precompute:
        p.append(Problem("reference.precompute", "online pairs are new every round, so there is nothing to "
                                                 "precompute: set it to false (log-probs are streamed)"))
    if (cfg.online.enabled or cfg.eval.prompts_file) and cfg.online.weight_sync == "nccl":
        p.append(Problem("online.weight_sync", "nccl is not wired into training runs yet (the broadcast "
                                               "pieces exist but were never run on GPUs); use object_store "
                                               "or checkpoint"))
    if cfg.online.judge.function and ":" not in cfg.online.judge.function:
        p.append(Problem("online.judge.function", "must look like 'package.module:function'"))
    if _is_remote(cfg.run.storage_path) and not cfg.tracking.mlflow.tracking_uri:
        p.append(Problem("tracking.mlflow.tracking_uri", "the default SQLite store needs a local "
                         "run.storage_path; set a tracking URI (e.g. http://mlflow:5000)"))


def _module_problem(module: str) -> Optional[str]:
    """Why ``module`` cannot be imported here, or None. A top-level package found only in the
    current directory (a job's working_dir) is accepted without looking further."""
    top = module.split(".")[0]
    try:
        if importlib.util.find_spec(top) is None:
            if importlib.machinery.PathFinder.find_spec(top, [os.getcwd()]) is not None:
                return None
            return f"no module named {top!r} (not installed, not in the current directory)"
        if importlib.util.find_spec(module) is None:
            return f"no module named {module!r}"
    except (ImportError, ValueError) as e:  # a parent package failed to import
        return f"cannot import {module!r}: {e}"
    return None


def _check_local_files(cfg: RunConfig, p: list[Problem]) -> None:
    if cfg.online.judge.function and ":" in cfg.online.judge.function:
        problem = _module_problem(cfg.online.judge.function.split(":", 1)[0].strip())
        if problem:
            p.append(Problem("online.judge.function", problem))
    _check_files("data.train_files", cfg.data.train_files, p)
    _check_files("data.eval_files", cfg.data.eval_files, p)
    for key, path in [("model.name_or_path", cfg.model.name_or_path),
                      ("model.tokenizer", cfg.model.tokenizer),
                      ("reference.model", cfg.reference.model),
                      ("eval.prompts_file", cfg.eval.prompts_file)]:
        local = key == "eval.prompts_file" or (path and _looks_local(path))
        if path and local and not _is_remote(path) and not os.path.exists(os.path.expanduser(path)):
            p.append(Problem(key, f"no such file or directory: {path!r}"))


# --------------------------------------------------------------------------- public API


def from_dict(data: dict, *, source: str = "config", check_files: bool = True) -> RunConfig:
    """Build and check a RunConfig; raise ConfigError listing every problem."""
    problems: list[Problem] = []
    cfg = _build(RunConfig, data if data is not None else {}, "", problems)
    # A key whose type was wrong fell back to its default; do not also report its range.
    reported = {q.key for q in problems}
    problems += [q for q in check(cfg, check_files=check_files) if q.key not in reported]
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


def local_cpus_needed(cfg: RunConfig) -> int:
    """Logical CPUs the run's actors hold at the same time, plus one for Ray Data tasks.

    Everything that can be up together during training: the policy workers, a reference
    group (streamed, or the evaluation's group after a precompute), generation engines
    (online rounds or held-out sampling) and reward-model judge actors. The feeder and the
    coordinator take no CPU.
    """
    need = cfg.policy.num_workers * cfg.policy.cpus_per_worker
    if needs_reference(cfg):  # SimPO / ORPO start no reference group
        need += cfg.reference.num_actors * cfg.reference.num_cpus_per_actor
    if cfg.online.enabled or cfg.eval.prompts_file:
        need += cfg.online.num_engines * cfg.online.num_cpus_per_engine
        if cfg.online.judge.reward_model:
            need += cfg.online.judge.num_actors * cfg.online.judge.num_cpus_per_actor
    return math.ceil(need) + 1


def duplicate_keys(text: str) -> list[Problem]:
    """A Problem per key that appears twice in one YAML mapping (PyYAML keeps the last one
    silently), naming its dotted path and both lines."""
    problems: list[Problem] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in node.value:
                key = str(key_node.value)
                path = f"{prefix}.{key}" if prefix else key
                line = key_node.start_mark.line + 1
                if key in seen:
                    problems.append(Problem(path, f"appears twice (lines {seen[key]} and {line}); YAML "
                                                  "would keep only the last one: remove one"))
                seen.setdefault(key, line)
                walk(value_node, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{prefix}[{i}]")

    walk(yaml.compose(text), "")
    return problems


def load_config(path: str, overrides: list[str] = (), *, check_files: bool = True) -> RunConfig:
    """Load a YAML run config, apply ``section.key=value`` overrides, validate."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        duplicates = duplicate_keys(text)
        data = yaml.safe_load(text) or {}
    except FileNotFoundError:
        raise ConfigError([Problem("<file>", f"config file not found: {path}")], source=path) from None
    except yaml.YAMLError as e:
        raise ConfigError([Problem("<yaml>", f"not valid YAML: {e}")], source=path) from None
    if duplicates:
        raise ConfigError(duplicates, source=path)
    if not isinstance(data, dict):
        raise ConfigError([Problem("<top>", "the config must be a mapping of sections")], source=path)
    data = apply_overrides(data, list(overrides))
    return from_dict(data, source=path, check_files=check_files)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: RunConfig) -> dict[str, str]:
    """Dotted key -> string value, e.g. for MLflow params."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = str(node)

    walk(to_dict(cfg), "")
    return out


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """A copy whose local paths are absolute, resolved against the current directory.

    Ray workers and actors do not share the driver's working directory (under
    ``ray job submit`` each runs in its own unpacked working_dir), so a relative model path
    that the driver sees would not resolve there. Hub ids and object-store URIs stay as is.
    """

    def local(path: Optional[str]) -> Optional[str]:  # always a path or a URI
        return path if not path or _is_remote(path) else os.path.abspath(os.path.expanduser(path))

    def fix(path: Optional[str]) -> Optional[str]:  # a path, a URI or a hub id
        return local(path) if path and _looks_local(path) else path

    def fix_all(paths: list[str]) -> list[str]:
        return [local(p) for p in paths]

    def template(value: Optional[str]) -> Optional[str]:  # a path or the template itself
        return value if not value or is_inline_template(value) else local(value)

    return dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, storage_path=local(cfg.run.storage_path)),
        model=dataclasses.replace(cfg.model, name_or_path=fix(cfg.model.name_or_path),
                                  tokenizer=fix(cfg.model.tokenizer), chat_template=template(cfg.model.chat_template)),
        data=dataclasses.replace(cfg.data, train_files=fix_all(cfg.data.train_files),
                                 eval_files=fix_all(cfg.data.eval_files)),
        reference=dataclasses.replace(cfg.reference, model=fix(cfg.reference.model),
                                      cache_dir=local(cfg.reference.cache_dir)),
        eval=dataclasses.replace(cfg.eval, prompts_file=local(cfg.eval.prompts_file)),
    )
