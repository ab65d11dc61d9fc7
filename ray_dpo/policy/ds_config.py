"""DeepSpeed config dict and learning-rate schedule for the policy workers.

Pure: imports neither ray nor deepspeed, so the config a run will use can be built,
printed and unit-tested anywhere.

The config deliberately has no ``optimizer`` and no ``scheduler`` section: the workers
pass a ``torch.optim.AdamW`` and a ``torch.optim.lr_scheduler.LambdaLR`` (driven by
`lr_lambda`) to ``deepspeed.initialize``. DeepSpeed's own Adam kernels (FusedAdam,
DeepSpeedCPUAdam) are JIT-compiled on first use (~44 s each on our 2-core CPU machines)
and buy nothing for the tiny models we test with.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ray_dpo.dtypes import dtype_name
from ray_dpo.feeder.plan import accumulation_steps

if TYPE_CHECKING:
    from ray_dpo.config import PolicyConfig

SCHEDULES = ("constant", "linear", "cosine")

# Bucket sizes (elements). DeepSpeed's defaults (5e8) are tuned for multi-billion-
# parameter models on GPUs; 2e8 keeps comm buckets large enough to saturate NCCL while
# bounding the extra memory per bucket to ~0.4-0.8 GB for 16/32-bit gradients.
_BUCKET = 200_000_000
# ZeRO-3: parameters smaller than this stay unpartitioned (gathering many tiny
# tensors - norms, biases - costs more in latency than it saves in memory).
_PARAM_PERSISTENCE_THRESHOLD = 100_000
_PREFETCH_BUCKET = 50_000_000


def build_ds_config(policy: PolicyConfig, *, dtype: str, world_size: int, universal: bool = False) -> dict[str, Any]:
    """The DeepSpeed config for `policy` on `world_size` data-parallel workers.

    policy: PolicyConfig (duck-typed): zero_stage, micro_batch_size (pairs per worker per
        forward), gradient_accumulation_steps, max_grad_norm (0 disables clipping),
        offload_optimizer.
    dtype: "fp32", "bf16" or "fp16" (ModelConfig.dtype).

    A "sample" for DeepSpeed is one preference pair: train_batch_size is pairs per
    optimizer step (each pair is two sequences in the forward).
    """
    dtype_name(dtype)  # ValueError for an unknown dtype
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    stage = policy.zero_stage
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"policy.zero_stage must be 0, 1, 2 or 3, got {stage}")
    if policy.offload_optimizer and stage == 0:
        raise ValueError("policy.offload_optimizer needs ZeRO: set policy.zero_stage to 1, 2 or 3")

    micro = policy.micro_batch_size
    # An elastic group on fewer ranks than policy.num_workers accumulates more micro-batches
    # so that a step keeps its pairs (ray_dpo.feeder's step layout).
    accum = accumulation_steps(policy.gradient_accumulation_steps, policy.num_workers, world_size)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": float(policy.max_grad_norm),
        "zero_optimization": _zero_section(stage, offload=policy.offload_optimizer),
        # bf16: DeepSpeed's mixed precision. The module's weights, activations and gradients are
        # bf16; the optimizer holds fp32 master weights and fp32 Adam state at every ZeRO stage
        # (docs/architecture.md, "Precision").
        "bf16": {"enabled": dtype == "bf16"},
        # Dynamic loss scaling (loss_scale 0): fp16 overflows otherwise on DPO's
        # log-prob sums, which reach hundreds of nats.
        "fp16": {"enabled": dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        # Metrics go through ray.train.report; DeepSpeed's own step log is noise.
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }
    if dtype == "bf16" and stage > 0:
        # Sum the micro-batches' bf16 gradients in fp32 (DeepSpeed's default is the model's
        # dtype). DeepSpeed 0.19 refuses this without ZeRO; config validation refuses bf16
        # with ZeRO-0 wherever a step would accumulate (ray_dpo.config.checks).
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if universal:
        # The engine loads a checkpoint converted to DeepSpeed's universal form (an elastic
        # group resuming on another number of ZeRO ranks): set only then, since this
        # setting cannot load a plain checkpoint.
        config["checkpoint"] = {"load_universal": True}
    if policy.offload_optimizer:
        # We pass torch AdamW (no JIT build); DeepSpeed refuses a client optimizer with
        # offload unless told that the slower CPU step is intended.
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def _zero_section(stage: int, *, offload: bool) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if stage == 0:
        return zero
    zero.update(
        contiguous_gradients=True,
        reduce_scatter=True,
        reduce_bucket_size=_BUCKET,
        allgather_bucket_size=_BUCKET,
    )
    if stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=_PREFETCH_BUCKET,
            stage3_param_persistence_threshold=_PARAM_PERSISTENCE_THRESHOLD,
            stage3_max_live_parameters=1_000_000_000,
            stage3_max_reuse_distance=1_000_000_000,
            # The final Hugging Face export needs whole weights on rank 0.
            stage3_gather_16bit_weights_on_model_save=True,
        )
        del zero["allgather_bucket_size"]  # a stage 1/2 setting; stage 3 uses the prefetch bucket
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return zero


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate before optimizer step `step` (0-based).

    Linear warmup from 1/(warmup_steps+1) to 1 over `warmup_steps` steps (never 0, so the
    first step still learns), then "constant" 1, "linear" decay to 0 at `total_steps`, or
    "cosine" decay to 0 at `total_steps`. Steps past `total_steps` stay at the final value.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if warmup_steps < 0 or total_steps < 0:
        raise ValueError(f"warmup_steps and total_steps must be >= 0, got {warmup_steps}, {total_steps}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
