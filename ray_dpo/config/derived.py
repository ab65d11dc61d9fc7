"""What a built RunConfig yields for the rest of ray_dpo: its YAML / flat forms, its paths
made absolute for Ray workers, and the CPUs a local cluster needs for it.

    to_dict(cfg) / to_yaml(cfg) / flatten(cfg)   (flatten: dotted key -> str, MLflow params)
    with_absolute_paths(cfg)                      local paths resolved against the cwd
    local_cpus_needed(cfg)                        logical CPUs the run's actors hold at once, + 1
    local_cpu_needs(cfg)                          the same, part by part
    local_cluster_cpus(cfg, cores=)               a local cluster's logical CPUs, and why
    heldout_judge(cfg)                            the held-out eval's judge (eval.judge, else online.judge)

The engines' settings (online or held-out) are ray_dpo.engines.spec.engine_spec(cfg).

Pure: imports neither torch, ray, deepspeed nor vllm at import time.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional

import yaml

from ray_dpo.config.paths import is_remote, looks_local
from ray_dpo.config.sections import JudgeConfig, RunConfig
from ray_dpo.data.chat_template import is_inline_template


def heldout_judge(cfg: RunConfig) -> JudgeConfig:
    """The judge of the held-out eval: eval.judge if set, else online.judge."""
    return cfg.eval.judge if _judge_set(cfg.eval.judge) else cfg.online.judge


def _judge_set(judge: JudgeConfig) -> bool:
    return bool(judge.function or judge.reward_model)


def local_cpu_needs(cfg: RunConfig) -> list[tuple[str, float]]:
    """(what, logical CPUs) of everything that can be up together during training: the
    actors ray_dpo.topology.roles lists (a reference group that lives before training only
    is counted too: it must fit while the others start), and one CPU for Ray Data tasks."""
    from ray_dpo.topology import roles  # imports this module's package

    parts = [(f"{role.counted} x {role.cpus:g}", role.total_cpus) for role in roles(cfg, use_gpu=False)]
    return parts + [("1 for Ray Data tasks", 1.0)]


def local_cpus_needed(cfg: RunConfig) -> int:
    """Logical CPUs the run's actors hold at the same time, plus one for Ray Data tasks
    (``local_cpu_needs``, rounded up)."""
    return math.ceil(sum(cpus for _, cpus in local_cpu_needs(cfg)))


def local_cluster_cpus(cfg: RunConfig, *, cores: int) -> tuple[int, str]:
    """(logical CPUs, why) of a local Ray cluster for ``cfg`` on a machine of ``cores`` cores:
    run.local_num_cpus, else max(4, cores, local_cpus_needed). Logical CPUs are scheduling
    tokens, not cores: Ray Data tasks, the reference actors and the engines must not starve
    behind the train workers."""
    need = local_cpus_needed(cfg)
    parts = f"{need} the run's actors hold at once: " + " + ".join(what for what, _ in local_cpu_needs(cfg))
    given = cfg.run.local_num_cpus
    if given:
        short = " (fewer: some actors wait for a CPU that never frees)" if given < need else ""
        return given, f"run.local_num_cpus{short}; {parts}"
    return max(4, cores, need), f"the most of 4, this machine's {cores} cores and {parts}"


def to_dict(cfg: Any) -> dict:
    """A config (or one section) as plain nested dicts."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig) -> str:
    """The config as YAML that load_config reads back to the same RunConfig."""
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
        return path if not path or is_remote(path) else os.path.abspath(os.path.expanduser(path))

    def fix(path: Optional[str]) -> Optional[str]:  # a path, a URI or a hub id
        return local(path) if path and looks_local(path) else path

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
