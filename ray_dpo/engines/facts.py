"""What the rest of ray_dpo may know about the generation engines and the weight-sync methods
without importing them: their names and facts, and where their code is.

    ENGINES         online.backend / eval.backend -> Engine (takes_max_model_len, actor_env,
                    .load() -> the engine class, imported then: engines/generation.py)
    SYNC_METHODS    online.weight_sync -> SyncMethod (needs_checkpoint_dir, sent_by_policy,
                    .send() -> the send function, imported then: engines/weight_sync.py)

Config validation, the driver's planning and the follower's setup read these; only the
processes that run an engine or send weights import the code behind them. Adding an
engine or a method is an entry here naming its code ("module:attribute").

Pure: no torch, ray or vllm.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable

from ray_dpo.registry import Registry


def _load(path: str) -> Any:
    module, attr = path.split(":")
    return getattr(importlib.import_module(module), attr)


def _no_env(use_gpu: bool) -> dict[str, str]:
    return {}


def _vllm_env(use_gpu: bool) -> dict[str, str]:
    """vLLM's engine core in the actor's own process; on CPU its KV cache size and no core
    pinning of its own (Ray places the actors)."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if not use_gpu:
        env.update(VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                   VLLM_CPU_OMP_THREADS_BIND=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"))
    return env


@dataclass(frozen=True)
class Engine:
    """A generation backend. code: "module:Class" of its GenerationEngine. takes_max_model_len:
    its constructor takes max_model_len (a context bound the caller should set). actor_env:
    environment variables its Ray actor needs, by use_gpu."""

    name: str
    code: str
    takes_max_model_len: bool = False
    actor_env: Callable[[bool], dict[str, str]] = _no_env

    def load(self) -> type:
        return _load(self.code)


ENGINES: Registry[Engine] = Registry("online.backend", {
    "vllm": Engine("vllm", "ray_dpo.engines.generation:VLLMEngine", takes_max_model_len=True, actor_env=_vllm_env),
    "transformers": Engine("transformers", "ray_dpo.engines.generation:TransformersEngine"),
})
"""Every engine online.backend (and eval.backend) may name."""


@dataclass(frozen=True)
class SyncMethod:
    """A weight-sync method. code: "module:function" of ``send(actors, weights, **options) ->
    [ObjectRef of a LoadReport]``. needs_checkpoint_dir: sending a state dict writes it to
    ``checkpoint_dir`` first (a directory every engine can read), which the caller passes.
    sent_by_policy: policy rank 0 sends the weights itself during the sync (``weights`` is a
    collective.SyncTicket), so there is no copy to reload a restarted engine from between
    syncs: only the next sync brings it up to date."""

    name: str
    code: str
    needs_checkpoint_dir: bool = False
    sent_by_policy: bool = False

    def send(self) -> Callable[..., list]:
        return _load(self.code)


SYNC_METHODS: Registry[SyncMethod] = Registry("weight sync method", {
    "object_store": SyncMethod("object_store", "ray_dpo.engines.weight_sync:send_object_store"),
    "checkpoint": SyncMethod("checkpoint", "ray_dpo.engines.weight_sync:send_checkpoint", needs_checkpoint_dir=True),
    "collective": SyncMethod("collective", "ray_dpo.engines.weight_sync:send_collective", sent_by_policy=True),
})
"""Every method online.weight_sync may name (docs/architecture.md compares them)."""
