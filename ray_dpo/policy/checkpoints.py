"""Policy checkpoints: save (DeepSpeed shards + RNG + a completeness manifest per rank) and
resume from the newest complete one.

Layout of one checkpoint directory (Ray merges every rank's files into it):

    deepspeed/latest, deepspeed/step<k>/...   a standard DeepSpeed checkpoint (optimizer, LR
                                              schedule, client_state {"step": k})
    rng/rank<r>.pt                            each rank's torch / numpy / Python RNG states
    manifest/rank<r>.json                     written last: the rank's files and their sizes
    hf_model/                                 final checkpoint only (rank 0); LoRA: merged, on request
    adapter/                                  final checkpoint of a LoRA run: the peft adapter

Every rank saves into its own local temp dir and reports it; Ray 2.60 gives all ranks one
checkpoint_dir_name (broadcast from rank 0) and copies every rank's files into it. DeepSpeed
names each rank's files uniquely (zero_pp_rank_<r>_..., model states and 'latest' from rank 0
only under ZeRO 0-2), so the merged directory is exactly what DeepSpeed writes on shared
storage, and every rank can load from it. Per-rank subdirectories (rank0/, rank1/) would not
work: under ZeRO 0-2 only rank 0 writes the model states, which every rank needs to load.

The directory name is ``checkpoint_<step:06d>``, or ``checkpoint_<step:06d>_<n>`` when that
name is taken (a resumed run reaching again the step of a checkpoint it could not use), so
a save never writes into an older directory (ray_dpo/faults.py).
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from typing import Any, Callable, Optional

import numpy as np
import ray
import ray.train
import torch

from ray_dpo import faults

logger = logging.getLogger("ray_dpo.policy")

DS_DIR = "deepspeed"
RNG_DIR = "rng"


def save_checkpoint(worker, step: int, metrics: dict, *, run_dir: Optional[str] = None,
                    export: Optional[Callable[[str], None]] = None) -> None:
    """Every rank saves its DeepSpeed shard, its RNG states and, last, its manifest, then
    reports the directory; ``export(root)`` (every rank) adds the final model files under the
    checkpoint's root (policy/weights.export_final)."""
    name = f"checkpoint_{step:06d}"
    if run_dir is not None:
        fs, path = faults.storage_fs(run_dir)
        name = faults.fresh_checkpoint_name(fs, path, step)
    with tempfile.TemporaryDirectory(prefix=f"ray_dpo_ckpt_rank{worker.rank}_") as tmp:
        # LoRA: the frozen base weights are the model directory's, so a checkpoint holds the
        # adapters and their optimizer state only (MBs, not the whole model every time).
        worker.engine.save_checkpoint(os.path.join(tmp, DS_DIR), tag=f"step{step}",
                                      client_state={"step": step},
                                      exclude_frozen_parameters=worker.policy.lora.enabled)
        if export is not None:
            export(tmp)
        _save_rng(os.path.join(tmp, RNG_DIR, f"rank{worker.rank}.pt"))
        faults.write_manifest(tmp, rank=worker.rank, world_size=worker.world_size, step=step)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=name)


def load_checkpoint(engine, *, rank: int = 0, frozen_excluded: bool = False) -> int:
    """Restore engine state (weights, optimizer, LR schedule) and this rank's RNG from the
    newest complete checkpoint at or before Ray's latest; returns the steps already done.

    Every rank reads the same manifests on the same storage, so all pick the same one.
    frozen_excluded: the checkpoint holds trainable parameters only (LoRA); the frozen ones
    keep the values the engine was built with (the base model)."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    chosen, warnings = faults.pick_checkpoint(checkpoint.filesystem, checkpoint.path)
    for warning in warnings:
        if rank == 0:
            logger.warning("%s", warning)
    if chosen is None:
        raise RuntimeError(
            f"no complete checkpoint to resume from in {os.path.dirname(checkpoint.path)} "
            f"({'; '.join(warnings)}). Move that directory away to start the run from step 0")
    if chosen != checkpoint.path and rank == 0:
        logger.warning("resuming from %s instead of the latest checkpoint %s: the steps after it "
                       "run again", chosen, checkpoint.path)
    source = ray.train.Checkpoint(path=chosen, filesystem=checkpoint.filesystem)
    with source.as_directory() as path:
        load_path, client_state = engine.load_checkpoint(os.path.join(path, DS_DIR),
                                                         load_module_strict=not frozen_excluded)
        if load_path is None:
            raise RuntimeError(f"checkpoint {chosen} has no DeepSpeed state under {DS_DIR}/; "
                               "was it written by ray_dpo.policy.worker?")
        _load_rng(os.path.join(path, RNG_DIR, f"rank{rank}.pt"))
    return int(client_state["step"])


def _save_rng(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # GPU path: not testable on CPU CI
        state["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(state, path)


def _load_rng(path: str) -> None:
    """Restore this rank's RNG states; a checkpoint from another world size may lack this
    rank's file, then the RNG starts fresh (said once in the log)."""
    if not os.path.exists(path):
        logger.info("no RNG state %s in the checkpoint; random streams start fresh", path)
        return
    state = torch.load(path, map_location="cpu", weights_only=False)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():  # GPU path: not testable on CPU CI
        torch.cuda.set_rng_state_all(state["cuda"])
