"""EngineSpec: the generation engines of a run, whichever section asked for them.

An online run's engines sample its rounds (and its held-out prompts); an offline run's
engines sample only the held-out prompts (eval.prompts_file). Both are described by one
EngineSpec, built by ``engine_spec(cfg)``:

    online run    the online section: backend, engines, resources, weight sync, round sampling
    offline run   eval.backend (else online.backend), the held-out max_new_tokens
                  (eval.max_new_tokens, else online.sampling's); engine count, resources and
                  weight sync still come from the online section, the one place they are set

The YAML keys stay where users write them (online.num_engines, online.weight_sync, ...), so
error messages name those keys.

Pure: imports no torch, ray or engine code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ray_dpo.capacity import DEFAULT_WAIT_S
from ray_dpo.config.sections import OnlineConfig, RunConfig, SamplingConfig


@dataclass(frozen=True)
class EngineSpec:
    """What GenerationGroup, the engine actors and the weight sync need."""

    backend: str = "vllm"
    """ENGINES name: vllm | transformers."""
    num_engines: int = 1
    num_cpus_per_engine: float = 1.0
    num_gpus_per_engine: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources of each engine actor (e.g. a node label)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """generate()'s default sampling: the rounds' (online.sampling), or the held-out eval's."""
    samples_per_prompt: int = 4
    """generate()'s default n."""
    weight_sync: str = "object_store"
    """SYNC_METHODS name: how the policy's weights reach the engines."""
    sync_bucket_mb: float = 256.0
    sync_timeout_s: float = 1800.0
    sync_tolerance: float = 1e-3
    """Largest |engine - policy| summed log-prob on the probe after a sync."""
    capacity_wait_s: float = DEFAULT_WAIT_S
    """run.capacity_wait_s: how long a restart waits for a node with room for a lost engine."""

    @classmethod
    def of_online(cls, online: OnlineConfig, **changes) -> "EngineSpec":
        """The engine fields of an online section (``changes`` replace some of them)."""
        names = {f.name for f in dataclasses.fields(cls)} & {f.name for f in dataclasses.fields(online)}
        return cls(**{**{n: getattr(online, n) for n in names}, **changes})

    @property
    def bucket_bytes(self) -> int:
        """sync_bucket_mb in bytes (at least 1)."""
        return max(1, int(self.sync_bucket_mb * 2**20))


def heldout_sampling(cfg: RunConfig) -> SamplingConfig:
    """online.sampling with the held-out eval's max_new_tokens (eval.max_new_tokens if set);
    the evaluator then samples at temperature 1, top_p 1 (engines.evaluation.eval_sampling)."""
    return dataclasses.replace(cfg.online.sampling,
                               max_new_tokens=cfg.eval.max_new_tokens or cfg.online.sampling.max_new_tokens)


def engine_spec(cfg: RunConfig) -> EngineSpec:
    """The run's engines: an online run's from the online section, an offline run's held-out
    engines from the eval section (see the module docstring)."""
    if cfg.online.enabled:
        return EngineSpec.of_online(cfg.online, capacity_wait_s=cfg.run.capacity_wait_s)
    return EngineSpec.of_online(cfg.online, backend=cfg.eval.backend or cfg.online.backend,
                                sampling=heldout_sampling(cfg), samples_per_prompt=cfg.eval.samples_per_prompt,
                                capacity_wait_s=cfg.run.capacity_wait_s)
