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

import dataclasses
import fcntl
import hashlib
import logging
import os
import random
import shutil
import tempfile
import time
from typing import Any, Callable, Optional

import numpy as np
import ray
import ray.train
import torch

from ray_dpo import compat, faults

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


@dataclasses.dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a (re)started group resumes from: its path on its filesystem, and how
    many data-parallel ranks saved it (an elastic group may now have another number)."""

    path: str
    filesystem: Any
    world_size: int

    def reshards(self, *, world_size: int, zero_stage: int) -> bool:
        """Saved by another number of ranks under ZeRO 1-3, whose optimizer state is split
        per rank: DeepSpeed loads it only through its universal form (load_checkpoint).
        ZeRO-0 keeps the whole optimizer state in every checkpoint: any number loads it."""
        return zero_stage > 0 and self.world_size != world_size


def find_resume_point(rank: int = 0) -> Optional[ResumePoint]:
    """The newest complete checkpoint at or before Ray's latest; None when the run starts.

    Every rank reads the same manifests on the same storage, so all pick the same one."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
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
    return ResumePoint(chosen, checkpoint.filesystem, faults.saved_world_size(checkpoint.filesystem, chosen))


def load_checkpoint(engine, point: Optional[ResumePoint], *, rank: int = 0, frozen_excluded: bool = False,
                    reshard: bool = False) -> int:
    """Restore engine state (weights, optimizer, LR schedule) and this rank's RNG from
    ``point``; returns the steps already done (0 without a point).

    frozen_excluded: the checkpoint holds trainable parameters only (LoRA); the frozen ones
    keep the values the engine was built with (the base model). reshard: the point was
    saved by another number of ZeRO ranks (ResumePoint.reshards): it is converted to
    DeepSpeed's universal form first, once per node, and the engine must have been built
    with checkpoint.load_universal (build_ds_config(universal=True))."""
    if point is None:
        return 0
    source = ray.train.Checkpoint(path=point.path, filesystem=point.filesystem)
    with source.as_directory() as path:
        ds_dir = os.path.join(path, DS_DIR)
        if reshard:
            load_dir, tag = universal_copy(ds_dir, point)
            load_path, client_state = engine.load_checkpoint(load_dir, tag=tag,
                                                             load_module_strict=not frozen_excluded)
            # Every rank reshards (they all see the same point and world size): once all have
            # loaded, no rank of this node needs the copy any more.
            torch.distributed.barrier()
            shutil.rmtree(load_dir, ignore_errors=True)
        else:
            load_path, client_state = engine.load_checkpoint(ds_dir, load_module_strict=not frozen_excluded)
        if load_path is None:
            raise RuntimeError(f"checkpoint {point.path} has no DeepSpeed state under {DS_DIR}/; "
                               "was it written by ray_dpo.policy.worker?")
        _load_rng(os.path.join(path, RNG_DIR, f"rank{rank}.pt"))
    return int(client_state["step"])


def universal_copy(ds_dir: str, point: ResumePoint) -> tuple[str, str]:
    """(load dir, tag) of the universal form of the checkpoint under ``ds_dir`` (local).

    The ranks of one node share one copy in the node's temp dir: the first to take the
    node-wide lock converts (DeepSpeed's ds_to_universal: the whole optimizer state, read
    once and written once per parameter: disk for fp32 weights and both Adam moments), the
    others find it done. load_checkpoint removes it once every rank has loaded."""
    with open(os.path.join(ds_dir, "latest"), encoding="utf-8") as f:
        tag = f.read().strip()
    key = hashlib.sha1(f"{point.path}|{tag}".encode()).hexdigest()[:16]
    root = os.path.join(tempfile.gettempdir(), "ray_dpo_universal", key)
    os.makedirs(root, exist_ok=True)
    universal = f"{tag}_universal"
    done = os.path.join(root, universal, ".converted")
    with open(os.path.join(root, ".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not os.path.exists(done):
                t0 = time.monotonic()
                if not compat.universal_checkpoint(os.path.join(ds_dir, tag), os.path.join(root, universal)):
                    raise RuntimeError(
                        f"checkpoint {point.path} was saved by {point.world_size} ZeRO workers and this "
                        "DeepSpeed cannot convert it for another number (deepspeed.checkpoint.ds_to_universal "
                        "is missing); resume on the same number of workers, or use policy.zero_stage 0")
                open(done, "w").close()
                logger.info("converted checkpoint %s from %d ZeRO ranks to DeepSpeed's universal form in %.1fs",
                            point.path, point.world_size, time.monotonic() - t0)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return root, universal


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
