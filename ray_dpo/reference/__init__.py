"""Reference log-probs: a frozen-model actor, the group that streams batches through it, a cache.

    ReferenceActor(model_path, *, dtype, device, ...)    one frozen model (plain class)
    ReferenceGroup(*, model_path, config, dtype, use_gpu, name_prefix)
        .score_batches(batches) -> ordered iterator, .score(rows), .kill_actor(i),
        .num_restarts, .num_retries, .shutdown()
    cache.cache_key / cache.save / cache.load             <cache_dir>/<key>/ref_logps.parquet

Names load lazily: ``from ray_dpo.reference import cache`` needs neither ray nor torch.
"""

from __future__ import annotations

from ray_dpo.lazy import lazy_names

_LAZY = {
    "ReferenceActor": "ray_dpo.reference.actor",
    "ReferenceGroup": "ray_dpo.reference.group",
    "ReferenceActorLostError": "ray_dpo.reference.group",
    "REF_COLUMNS": "ray_dpo.reference.group",
    "cache_key": "ray_dpo.reference.cache",
    "cache": "ray_dpo.reference.cache",
}

__getattr__, __all__ = lazy_names(__name__, _LAZY)
