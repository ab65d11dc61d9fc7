"""Online DPO: generation engines and their Ray actor group, weight sync from the policy.

    generation.GenerationGroup(*, model_path, config: OnlineConfig, use_gpu)
        .generate(prompts, n=, sampling=, seed=) -> list[list[Completion]]
        .sync_weights(weights, method=, probe=, expected=) -> SyncReport
        .verify(probe, expected) -> float, .probe_logps(probe), .shutdown()
    generation.VLLMEngine / TransformersEngine       one engine (plain classes)
    weight_sync.WeightSyncError, random_probe, torch_probe_logps, SyncReport

Names load lazily, so importing this package costs nothing (no torch, ray or vllm) until
one is used; vllm is imported only inside a VLLMEngine.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Completion": "ray_dpo.online.generation",
    "GenerationEngine": "ray_dpo.online.generation",
    "GenerationGroup": "ray_dpo.online.generation",
    "TransformersEngine": "ray_dpo.online.generation",
    "VLLMEngine": "ray_dpo.online.generation",
    "ENGINES": "ray_dpo.online.generation",
    "LoadReport": "ray_dpo.online.weight_sync",
    "NcclWeightSender": "ray_dpo.online.weight_sync",
    "SyncReport": "ray_dpo.online.weight_sync",
    "WeightSyncError": "ray_dpo.online.weight_sync",
    "random_probe": "ray_dpo.online.weight_sync",
    "save_safetensors": "ray_dpo.online.weight_sync",
    "torch_probe_logps": "ray_dpo.online.weight_sync",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ray_dpo.online' has no attribute {name!r}")
