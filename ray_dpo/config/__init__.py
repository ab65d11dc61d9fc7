"""Run configuration: typed dataclasses loaded from one YAML file.

A run is described by a YAML file whose top-level sections map onto the dataclasses of
``sections``. Every field is documented where it is declared. Loading goes

    YAML (yaml.safe_load) -> apply ``--set a.b=c`` overrides -> old key names renamed
    -> build dataclasses -> check every field -> RunConfig, or one ConfigError listing
    every problem

so a user fixes a config in one round trip instead of one error at a time.

    sections.py   the dataclasses (RunConfig and its sections)
    loading.py    load_config, from_dict, apply_overrides, duplicate_keys, RENAMED_KEYS
    building.py   YAML values -> dataclasses by their type hints
    checks.py     check(cfg): ranges, consistency, files; asks the registries for facts
    names.py      OneOf: a field whose names come from a registry (ray_dpo.registry)
    derived.py    to_yaml, flatten, with_absolute_paths, local_cpus_needed, local_cluster_cpus
    paths.py      REMOTE_PREFIXES, join_path, is_remote
    errors.py     Problem, ConfigError

This package is pure: importing it imports neither torch, ray, deepspeed nor vllm (the
registries are imported when a config is checked).
"""

from ray_dpo.config.checks import check
from ray_dpo.config.derived import (flatten, local_cluster_cpus, local_cpu_needs, local_cpus_needed, to_dict, to_yaml,
                                    with_absolute_paths)
from ray_dpo.config.errors import ConfigError, Problem
from ray_dpo.config.loading import (
    RENAMED_KEYS,
    DeprecatedKeyWarning,
    apply_overrides,
    duplicate_keys,
    from_dict,
    load_config,
)
from ray_dpo.config.paths import REMOTE_PREFIXES, join_path
from ray_dpo.config.sections import (
    DataConfig,
    EvalConfig,
    JudgeConfig,
    LoraSection,
    LossConfig,
    MLflowConfig,
    ModelConfig,
    OnlineConfig,
    PolicyConfig,
    ReferenceConfig,
    RunConfig,
    RunSection,
    SamplingConfig,
    SweepConfig,
    TrackingConfig,
)

__all__ = [
    "REMOTE_PREFIXES", "RENAMED_KEYS", "ConfigError", "DataConfig", "DeprecatedKeyWarning", "EvalConfig",
    "JudgeConfig", "LoraSection", "LossConfig", "MLflowConfig", "ModelConfig", "OnlineConfig", "PolicyConfig", "Problem",
    "ReferenceConfig", "RunConfig", "RunSection", "SamplingConfig", "SweepConfig", "TrackingConfig", "apply_overrides",
    "check", "duplicate_keys", "flatten", "from_dict", "join_path", "load_config", "local_cluster_cpus",
    "local_cpu_needs", "local_cpus_needed", "to_dict", "to_yaml", "with_absolute_paths",
]
