"""TrainLoopSpec: what the driver hands every policy worker's train loop (pure).

Ray Train passes train_loop_config to the loop as a dict: the driver sends
``spec.as_config()`` and ``train_loop_per_worker`` rebuilds the spec with ``from_config``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from ray_dpo.config import LossConfig, ModelConfig, PolicyConfig


@dataclass(frozen=True)
class TrainLoopSpec:
    """The policy workers' inputs: config sections and the actor handles they talk to."""

    model: ModelConfig
    """The policy model (path, dtype, attention, chat template for the HF export)."""
    policy: PolicyConfig
    """Optimizer, ZeRO, batch layout, checkpoints, SIGTERM grace."""
    loss: LossConfig
    """The preference loss and its parameters."""
    feeder: Any
    """Where steps come from: the actor handle of a StepSource (ray_dpo/seams.py: a
    BatchFeeder, or the OnlineCoordinator)."""
    eval_every: int = 0
    """Evaluate every this-many optimizer steps (0: only at the end)."""
    follower: Any = None
    """The actor handle of a PolicySync (ray_dpo/seams.py) whose generation engines follow the
    policy (OnlineCoordinator, or an offline run's held-out PolicyFollower), or None; rank 0
    advances it at its sync points."""
    device: Optional[str] = None
    """"cpu" | "cuda" | None (cuda if available)."""
    run_dir: Optional[str] = None
    """The run's storage directory, where checkpoint_* directories go (a name is never
    reused there); None: plain checkpoint_<step> names."""
    seed: int = 0
    """run.seed: every rank seeds torch with it before building the model, so the fresh LoRA
    adapters (and any other initialisation noise) are the same on every rank and in every
    run of the config."""

    def as_config(self) -> dict[str, Any]:
        """The fields as Ray Train's train_loop_config dict (values as they are, not copied)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "TrainLoopSpec":
        """The spec back from ``as_config()``'s dict."""
        return cls(**config)
