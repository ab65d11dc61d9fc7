"""build_ds_config and lr_lambda: pure, no DeepSpeed import."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from ray_dpo.config import PolicyConfig
from ray_dpo.policy.ds_config import build_ds_config, lr_lambda


def policy(**kw) -> PolicyConfig:
    return PolicyConfig(**{"micro_batch_size": 4, "gradient_accumulation_steps": 3, **kw})


def test_batch_sizes_multiply_over_workers():
    cfg = build_ds_config(policy(), dtype="fp32", world_size=2)
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 4 * 3 * 2  # DeepSpeed asserts exactly this identity


def test_no_deepspeed_optimizer_or_scheduler_sections():
    # We pass torch AdamW + LambdaLR: a DeepSpeed optimizer section would JIT-build Adam kernels.
    for stage in (0, 1, 2, 3):
        cfg = build_ds_config(policy(zero_stage=stage), dtype="bf16", world_size=4)
        assert "optimizer" not in cfg and "scheduler" not in cfg


@pytest.mark.parametrize("dtype, bf16, fp16",
                         [("fp32", False, False), ("bf16", True, False), ("fp16", False, True)])
def test_precision_sections(dtype, bf16, fp16):
    cfg = build_ds_config(policy(), dtype=dtype, world_size=1)
    assert cfg["bf16"]["enabled"] is bf16
    assert cfg["fp16"]["enabled"] is fp16
    assert cfg["fp16"]["loss_scale"] == 0  # dynamic loss scaling whenever fp16 is on


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_sums_gradients_in_fp32_under_zero(stage):
    # DeepSpeed's default accumulation dtype is the weights' (bf16); it refuses fp32 without
    # ZeRO, where config validation refuses bf16 steps that accumulate instead.
    cfg = build_ds_config(policy(zero_stage=stage), dtype="bf16", world_size=2)
    assert cfg.get("data_types") == ({"grad_accum_dtype": "fp32"} if stage else None)
    assert "data_types" not in build_ds_config(policy(zero_stage=stage), dtype="fp32", world_size=2)


def test_gradient_clipping_follows_max_grad_norm():
    assert build_ds_config(policy(max_grad_norm=0.5), dtype="fp32", world_size=1)["gradient_clipping"] == 0.5
    assert build_ds_config(policy(max_grad_norm=0), dtype="fp32", world_size=1)["gradient_clipping"] == 0.0


def test_zero_sections_per_stage():
    z0 = build_ds_config(policy(zero_stage=0), dtype="fp32", world_size=2)["zero_optimization"]
    assert z0 == {"stage": 0}
    z2 = build_ds_config(policy(zero_stage=2), dtype="fp32", world_size=2)["zero_optimization"]
    assert z2["stage"] == 2 and z2["reduce_bucket_size"] >= 10**7 and "offload_optimizer" not in z2
    assert not any(k.startswith("stage3_") for k in z2)
    z3 = build_ds_config(policy(zero_stage=3), dtype="bf16", world_size=2)["zero_optimization"]
    assert z3["stage"] == 3
    assert z3["stage3_gather_16bit_weights_on_model_save"] is True  # the HF export needs it
    assert z3["stage3_param_persistence_threshold"] > 0


def test_offload_only_when_asked_and_allows_the_torch_optimizer():
    cfg = build_ds_config(policy(zero_stage=2, offload_optimizer=True), dtype="bf16", world_size=2)
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_force_ds_cpu_optimizer"] is False
    plain = build_ds_config(policy(zero_stage=2), dtype="bf16", world_size=2)
    assert "offload_optimizer" not in plain["zero_optimization"] and "zero_force_ds_cpu_optimizer" not in plain


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "fp8", "world_size": 1}, "dtype must be one of fp32, bf16, fp16"),
    ({"dtype": "fp32", "world_size": 0}, "world_size must be >= 1"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_ds_config(policy(), **kwargs)


def test_bad_policy_settings_say_how_to_fix():
    with pytest.raises(ValueError, match="zero_stage must be 0, 1, 2 or 3"):
        build_ds_config(policy(zero_stage=4), dtype="fp32", world_size=1)
    with pytest.raises(ValueError, match="offload_optimizer needs ZeRO: set policy.zero_stage"):
        build_ds_config(policy(zero_stage=0, offload_optimizer=True), dtype="fp32", world_size=1)


def test_config_is_json_serialisable():
    import json

    cfg = build_ds_config(policy(zero_stage=3, offload_optimizer=True), dtype="bf16", world_size=8)
    assert json.loads(json.dumps(cfg)) == cfg


# --------------------------------------------------------------------------- lr_lambda


def lrs(schedule, *, warmup, total):
    return [lr_lambda(s, warmup_steps=warmup, total_steps=total, schedule=schedule) for s in range(total)]


def test_warmup_is_linear_and_never_zero():
    assert lrs("constant", warmup=3, total=6) == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_linear_decays_towards_zero_at_total_steps():
    assert lrs("linear", warmup=0, total=4) == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert lrs("linear", warmup=2, total=6) == pytest.approx([1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25])


def test_cosine_hand_computed():
    # After warmup w, step s: 0.5 * (1 + cos(pi * (s - w) / (total - w))).
    expected = [0.5] + [0.5 * (1 + math.cos(math.pi * k / 5)) for k in range(5)]
    assert lrs("cosine", warmup=1, total=6) == pytest.approx(expected)


def test_past_the_end_stays_at_the_final_value():
    assert lr_lambda(10, warmup_steps=0, total_steps=4, schedule="linear") == 0.0
    assert lr_lambda(10, warmup_steps=0, total_steps=4, schedule="cosine") == pytest.approx(0.0)
    assert lr_lambda(0, warmup_steps=0, total_steps=0, schedule="cosine") == 1.0  # no division by zero


def test_unknown_schedule_lists_the_valid_ones():
    with pytest.raises(ValueError, match="constant, linear, cosine"):
        lr_lambda(0, warmup_steps=0, total_steps=1, schedule="step")


def test_ds_config_imports_neither_deepspeed_nor_ray():
    code = "import sys, ray_dpo.policy.ds_config; print([m for m in ('deepspeed', 'ray') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
