"""bf16 mixed precision (model.dtype: bf16) through the policy's own engine set-up
(ray_dpo.policy.worker.setup_engine) and the reference actor class, on the tiny model.

One process, gloo world size 1, no Ray (a Ray Train run would add ~15 s for nothing these
checks read): DeepSpeed's bf16 mode must keep fp32 master weights and fp32 Adam state
(exp_avg, exp_avg_sq) under ZeRO 1 and 3, sum micro-batch gradients in fp32, and still
train; the bf16 reference must score in fp32 close to the fp32 one.
"""

from __future__ import annotations

import math
import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo default group, as Ray Train's TorchTrainer would have made it."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # DeepSpeed reads the launcher's variables (LOCAL_RANK etc.), which Ray Train sets.
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def pairs(tiny_assets):
    """8 tokenized synthetic pairs with reference log-probs from the fp32 initial model."""
    from transformers import AutoTokenizer

    from ray_dpo.reference.actor import ReferenceActor
    from ray_dpo.testing.assets import make_preference_rows

    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])

    def response(text):
        return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    rows = [{"pair_id": str(i), "prompt_ids": tok(r["prompt"])["input_ids"], "chosen_ids": response(r["chosen"]),
             "rejected_ids": response(r["rejected"])} for i, r in enumerate(make_preference_rows(8, seed=3))]
    ref = ReferenceActor(tiny_assets["model"], dtype="fp32").log_probs(rows)
    for row, c, r in zip(rows, ref["ref_chosen_logp"], ref["ref_rejected_logp"]):
        row.update(ref_chosen_logp=c, ref_rejected_logp=r)
    return rows


def test_bf16_reference_scores_in_fp32(tiny_assets, pairs):
    from ray_dpo.reference.actor import ReferenceActor

    actor = ReferenceActor(tiny_assets["model"], dtype="bf16")
    assert str(actor.model.dtype) == "torch.bfloat16"
    got = actor.log_probs(pairs)
    for name in ("ref_chosen_logp", "ref_rejected_logp"):
        for bf16, fp32 in zip(got[name], [p[name] for p in pairs]):
            # Sums of ~10-30 tokens from bf16 logits: within 2% of the fp32 sum, never NaN.
            assert math.isfinite(bf16) and abs(bf16 - fp32) <= 0.02 * abs(fp32) + 0.05, (name, bf16, fp32)


@pytest.mark.parametrize("stage", [1, 3])
def test_bf16_trains_with_fp32_master_weights_and_adam_state(stage, tiny_assets, pairs, process_group):
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from ray_dpo.batching.layouts import build_batch, model_inputs, pair_logps
    from ray_dpo.config import LossConfig, ModelConfig, PolicyConfig
    from ray_dpo.losses import dpo_loss
    from ray_dpo.policy.worker import setup_engine

    policy = PolicyConfig(zero_stage=stage, micro_batch_size=4, gradient_accumulation_steps=2, learning_rate=1e-3,
                          warmup_steps=0, lr_scheduler="constant")
    engine, hf_ds_config = setup_engine(ModelConfig(name_or_path=tiny_assets["model"], dtype="bf16"), policy,
                                        device=torch.device("cpu"), world_size=1, total_steps=6)
    assert engine.get_data_types() == (torch.bfloat16, torch.float32)  # (weights, gradient accumulation)
    losses = []
    for _ in range(6):
        step_loss = 0.0
        for micro in (pairs[:4], pairs[4:]):  # 2 micro-batches a step, summed by DeepSpeed
            batch = build_batch(micro, layout="padded", pad_token_id=0)
            logits = engine(**model_inputs(batch, dtype=torch.bfloat16)).logits
            chosen, rejected, _, _ = pair_logps(logits, batch)
            assert logits.dtype == torch.bfloat16 and chosen.dtype == torch.float32
            ref = torch.tensor([[p["ref_chosen_logp"], p["ref_rejected_logp"]] for p in micro])
            loss = dpo_loss(policy_chosen_logps=chosen, policy_rejected_logps=rejected, ref_chosen_logps=ref[:, 0],
                            ref_rejected_logps=ref[:, 1], config=LossConfig(beta=0.1)).losses.mean()
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / 2
        losses.append(step_loss)
    assert abs(losses[0] - math.log(2)) < 0.02  # bf16 policy vs the fp32 reference at step 0
    assert losses[-1] < losses[0] - 0.1, losses

    checked = 0
    for name, param in engine.module.named_parameters():
        held = param.ds_tensor if stage == 3 else param  # ZeRO-3: this rank's partition
        assert held.dtype == torch.bfloat16, name
        master = safe_get_full_fp32_param(param)
        assert master.dtype == torch.float32 and master.shape == getattr(param, "ds_shape", param.shape), name
        for state in ("exp_avg", "exp_avg_sq"):
            assert safe_get_full_optimizer_state(param, state).dtype == torch.float32, (name, state)
        checked += 1
    assert checked == len(list(engine.module.parameters())) > 0
    # The torch AdamW DeepSpeed wraps keeps every state tensor in fp32 as well.
    kept = [t for s in engine.basic_optimizer.state.values() for t in s.values()
            if torch.is_tensor(t) and t.numel() > 1]
    assert kept and {t.dtype for t in kept} == {torch.float32}
    engine.destroy()
    del hf_ds_config
