"""A sweep's trials, worked out before anything starts: every one a checked RunConfig.

    grid_args(["loss.beta=0.05,0.1", ...]) -> {key: [values]}    the CLI's --grid
    expand(cfg, grid=None, source=) -> [Trial]                   grid x samples, each trial's
                                                                 config built and checked; a
                                                                 ConfigError lists every bad trial
    sweep_name(cfg)                                              sweep.name, else run.name

A trial's identity is its overrides: its run.name is the sweep's name plus a readable slug
and a short hash of them, so running the same sweep again finds each trial's checkpoints and
MLflow run (and a changed grid does not mistake one trial for another).

Pure: imports neither torch, ray, deepspeed nor vllm.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import random
import re
from typing import Any, Iterable, Optional

from ray_dpo.config import ConfigError, Problem, RunConfig, SweepConfig, from_dict, to_dict
from ray_dpo.config.loading import apply_overrides, override_value


@dataclasses.dataclass(frozen=True)
class Trial:
    name: str
    """The trial's run.name (and MLflow run name)."""
    overrides: dict[str, Any]
    """Dotted key -> value, in the sweep's key order: what sets this trial apart."""
    config: RunConfig
    """The trial's whole config, checked; its sweep section is empty."""

    @property
    def label(self) -> str:
        return " ".join(f"{k}={_text(v)}" for k, v in self.overrides.items())


def sweep_name(cfg: RunConfig) -> str:
    return cfg.sweep.name or cfg.run.name


def grid_args(items: Iterable[str]) -> dict[str, list]:
    """``--grid key=v1,v2,...`` (repeatable) -> {key: [values]}; each value is read as YAML
    (0.1 a number, true a boolean), a whole ``key=[...]`` as one YAML list."""
    out: dict[str, list] = {}
    problems = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            problems.append(Problem(item, "a --grid must look like section.key=value1,value2"))
            continue
        parsed = override_value(raw) if raw.strip().startswith("[") else None
        values = parsed if isinstance(parsed, list) else [override_value(v.strip()) for v in raw.split(",")]
        out[key] = values
    if problems:
        raise ConfigError(problems, source="--grid")
    return out


def _text(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _slug(overrides: dict[str, Any]) -> str:
    """beta0.05-enabledtrue: the last part of each key and its value, kept to name-safe characters."""
    parts = [f"{key.rsplit('.', 1)[-1]}{_text(value)}" for key, value in overrides.items()]
    slug = re.sub(r"[^A-Za-z0-9_.=+-]+", "", "-".join(parts)).replace("..", ".")
    return slug[:48].strip(".-") or "base"


def trial_name(sweep: str, overrides: dict[str, Any]) -> str:
    digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:6]
    return f"{sweep}-{_slug(overrides)}-{digest}"


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _number(value: Any) -> Any:
    """1e-9 as a number: YAML 1.1 (PyYAML) reads an exponent without a dot as text."""
    return float(value) if isinstance(value, str) and _FLOAT.fullmatch(value.strip()) else value


def _draw(kind: str, args: list, rng: random.Random) -> Any:
    if kind == "uniform":
        return rng.uniform(args[0], args[1])
    if kind == "loguniform":
        return math.exp(rng.uniform(math.log(args[0]), math.log(args[1])))
    return rng.choice(args)


def points(sweep: SweepConfig, *, seed: int, grid: Optional[dict[str, list]] = None) -> list[dict[str, Any]]:
    """Every trial's overrides: the grid's combinations (sweep.grid, with ``grid`` adding or
    replacing keys), each with num_samples draws of sweep.sample (seeded: the same sweep
    draws the same values again, so a rerun finds its trials)."""
    axes = {key: [_number(v) for v in values] for key, values in {**sweep.grid, **(grid or {})}.items()}
    combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())] if axes else [{}]
    out = []
    for i, combo in enumerate(combos):
        for draw in range(sweep.num_samples if sweep.sample else 1):
            rng = random.Random(f"{seed}:{i}:{draw}")
            sampled = {key: _draw(*next(iter(dist.items())), rng) for key, dist in sorted(sweep.sample.items())}
            out.append({**combo, **sampled})
    return out


def expand(cfg: RunConfig, *, grid: Optional[dict[str, list]] = None, source: str = "config",
           check_files: bool = True) -> list[Trial]:
    """The trials of ``cfg``'s sweep, each config built from ``cfg`` plus its overrides and
    checked like ``ray-dpo validate`` checks a config: a ConfigError lists the problems of
    every trial (each key prefixed by the trial's overrides), before anything has started.

    With sweep.share_reference the sweep sets reference.precompute: true for offline trials
    that read a reference group (it computes that pass once, for all of them), false for
    online trials (their pairs are new every round), so one config can sweep both."""
    from ray_dpo.loss_rules import reference_source

    sweep = cfg.sweep
    base = to_dict(dataclasses.replace(cfg, sweep=SweepConfig()))
    trials, names = [], set()
    problems: dict[tuple[str, str], list[str]] = {}  # (key, message) -> the trials that have it
    name = sweep_name(cfg)
    for overrides in points(sweep, seed=cfg.run.seed, grid=grid):
        label = " ".join(f"{k}={_text(v)}" for k, v in overrides.items()) or "(no overrides)"
        data = json.loads(json.dumps(base))  # a deep copy of plain YAML values
        try:
            apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
            tname = trial_name(name, overrides)
            if sweep.share_reference and (data.get("online") or {}).get("enabled"):
                # The sweep owns reference.precompute: online trials stream theirs (their
                # pairs are new every round), offline ones read the shared pass (below).
                data.setdefault("reference", {})["precompute"] = False
            data["run"]["name"] = tname
            data["tracking"]["mlflow"]["run_name"] = tname
            trial_cfg = from_dict(data, source=f"trial {label}", check_files=check_files)
        except ConfigError as err:
            for q in err.problems:
                problems.setdefault((q.key, q.message), []).append(label)
            continue
        if sweep.share_reference and not trial_cfg.online.enabled and reference_source(trial_cfg) == "group":
            trial_cfg = dataclasses.replace(trial_cfg, reference=dataclasses.replace(trial_cfg.reference,
                                                                                      precompute=True))
        if tname in names:
            problems.setdefault(("sweep.grid", "the same overrides twice: remove the repeated value"), []).append(label)
            continue
        names.add(tname)
        trials.append(Trial(name=tname, overrides=overrides, config=trial_cfg))
    if problems:
        raise ConfigError([Problem(key, f"{message} (in {_trials_text(labels)})")
                           for (key, message), labels in problems.items()], source=source)
    return trials


def _trials_text(labels: list[str]) -> str:
    shown = "; ".join(labels[:3]) + (f"; ... {len(labels) - 3} more" if len(labels) > 3 else "")
    return f"trial {shown}" if len(labels) == 1 else f"{len(labels)} trials: {shown}"


def reference_share_key(cfg: RunConfig) -> Optional[str]:
    """What an offline trial's cached reference pass depends on, as text (the sections the
    cache key is built from: reference model, tokenizer, data, dtype); None for a trial that
    shares no pass (online, reference-free, LoRA adapters_off, or streamed)."""
    from ray_dpo.loss_rules import reference_source, trains_unpaired

    if cfg.online.enabled or reference_source(cfg) != "group" or not cfg.reference.precompute:
        return None
    facts = {"unpaired": trains_unpaired(cfg), "model": cfg.reference.model or cfg.model.name_or_path,
             "tokenizer": cfg.model.tokenizer,
             "chat_template": cfg.model.chat_template, "dtype": cfg.model.dtype, "data": to_dict(cfg.data),
             "cache_dir": cfg.reference.cache_dir, "storage": cfg.run.storage_path}
    return json.dumps(facts, sort_keys=True, default=str)
