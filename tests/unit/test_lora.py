"""LoRA without Ray: the policy.lora config and its checks, the target-module check against a
real (tiny) model, the adapters-off reference against the reference actor's log-probs, and
the merged export against the adapter model."""

from __future__ import annotations

import pytest
import torch

from ray_dpo.config import ConfigError, LoraSection, apply_overrides, from_dict


def _config(tiny_assets, **overrides):
    data = {
        "model": {"name_or_path": tiny_assets["model"], "dtype": "fp32"},
        "data": {"train_files": [tiny_assets["train_glob"]]},
    }
    return from_dict(apply_overrides(data, [f"{k}={v}" for k, v in overrides.items()]))


def _problems(tiny_assets, **overrides) -> str:
    with pytest.raises(ConfigError) as err:
        _config(tiny_assets, **overrides)
    return str(err.value)


def test_lora_is_off_by_default_and_its_keys_load(tiny_assets):
    assert not _config(tiny_assets).policy.lora.enabled
    cfg = _config(tiny_assets, **{"policy.lora.rank": 4, "policy.lora.target_modules": "[q_proj, v_proj]",
                                  "policy.lora.reference": "group"})
    lora = cfg.policy.lora
    assert lora.enabled and lora.rank == 4 and lora.target_modules == ["q_proj", "v_proj"]
    assert lora.reference == "group"


def test_a_target_module_the_model_lacks_is_an_error_listing_its_linear_layers(tiny_assets):
    message = _problems(tiny_assets, **{"policy.lora.rank": 4, "policy.lora.target_modules": "[q_proj, qkv]"})
    assert "policy.lora.target_modules" in message and "'qkv'" in message
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in message
    assert "'q_proj'" not in message  # only the missing name is reported


@pytest.mark.parametrize("overrides, key, words", [
    ({"policy.lora.rank": -1}, "policy.lora.rank", "must be >= 0"),
    ({"policy.lora.rank": 4, "policy.lora.dropout": 1.0}, "policy.lora.dropout", "[0, 1)"),
    ({"policy.lora.rank": 4, "policy.lora.alpha": 0}, "policy.lora.alpha", "> 0"),
    ({"policy.lora.rank": 4, "policy.lora.target_modules": "[all-linear, q_proj]"},
     "policy.lora.target_modules", "give it alone"),
    ({"policy.lora.rank": 4, "reference.model": "{model}"}, "reference.model", "policy.lora.reference=group"),
    ({"policy.lora.rank": 4, "reference.precompute": True}, "reference.precompute", "policy.lora.reference=group"),
    ({"policy.lora.reference": "base"}, "policy.lora.reference", "'adapters_off', 'group'"),
    ({"policy.lora.rank": 4, "policy.lora.modules_to_save": "[lm_head]", "online.enabled": True,
      "online.judge.function": "ray_dpo.testing.assets:judge_score"},
     "policy.lora.modules_to_save", "policy.lora.sync=merged"),
    ({"policy.lora.rank": 4, "policy.lora.target_modules": "[q_proj, lm_head]", "online.enabled": True,
      "online.judge.function": "ray_dpo.testing.assets:judge_score"},
     "policy.lora.target_modules", "drops it silently"),
])
def test_bad_lora_settings_name_the_key_and_the_fix(tiny_assets, overrides, key, words):
    overrides = {k: str(v).replace("{model}", tiny_assets["model"]) for k, v in overrides.items()}
    message = _problems(tiny_assets, **overrides)
    line = next(line for line in message.splitlines() if key in line)
    assert words in line


def test_group_reference_may_precompute_and_name_another_reference(tiny_assets):
    cfg = _config(tiny_assets, **{"policy.lora.rank": 4, "policy.lora.reference": "group",
                                  "reference.precompute": True})
    assert cfg.reference.precompute


def test_the_cli_exits_2_naming_the_missing_module(tiny_assets, tmp_path):
    import subprocess
    import sys

    import yaml

    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": tiny_assets["model"]},
                                    "data": {"train_files": [tiny_assets["train_glob"]]},
                                    "policy": {"lora": {"rank": 4, "target_modules": ["qkv_proj"]}}}))
    proc = subprocess.run([sys.executable, "-m", "ray_dpo.cli", "validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "policy.lora.target_modules" in proc.stderr and "'qkv_proj'" in proc.stderr


def _adapted(model_path: str, seed: int = 0):
    """The tiny model with rank-4 adapters on every linear layer, their B matrices random (a
    fresh adapter computes exactly the base model, which would make the checks trivial)."""
    from transformers import AutoModelForCausalLM

    from ray_dpo import lora

    model = lora.wrap(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32),
                      LoraSection(rank=4, alpha=8))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    return model.eval()


def _rows(vocab: int, n: int = 6):
    gen = torch.Generator().manual_seed(1)

    def ids(k):
        return torch.randint(3, vocab, (k,), generator=gen).tolist()

    return [{"pair_id": f"p{i}", "prompt_ids": ids(3 + i), "chosen_ids": ids(4 + i % 3), "rejected_ids": ids(2 + i)}
            for i in range(n)]


@pytest.mark.parametrize("layout", ["padded", "packed", "prefix_shared"])
def test_adapters_off_log_probs_equal_the_reference_actors_on_the_base_model(tiny_assets, layout):
    from ray_dpo import compat, lora
    from ray_dpo.batching.layouts import build_batch, model_inputs, pair_logps
    from ray_dpo.reference.actor import ReferenceActor

    model = _adapted(tiny_assets["model"])
    rows = _rows(model.config.vocab_size)
    batch = build_batch(rows, layout=layout, pad_token_id=0)
    inputs = model_inputs(batch, attn_implementation=compat.attn_implementation(model.config),
                          dtype=torch.float32)
    chosen, rejected = lora.adapters_off_logps(model, inputs, batch)

    reference = ReferenceActor(tiny_assets["model"], dtype="fp32", layout=layout).log_probs(rows)
    assert torch.allclose(chosen, torch.tensor(reference["ref_chosen_logp"]), atol=1e-5, rtol=0)
    assert torch.allclose(rejected, torch.tensor(reference["ref_rejected_logp"]), atol=1e-5, rtol=0)
    # ... and the adapters do change the policy's own log-probs, so the switch is real.
    with torch.no_grad():
        on_chosen, _, _, _ = pair_logps(model(**inputs).logits, batch)
    assert (on_chosen - chosen).abs().max() > 1e-2


def test_merged_export_computes_what_the_adapter_model_computes(tiny_assets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ray_dpo import lora
    from ray_dpo.config import ModelConfig

    model = _adapted(tiny_assets["model"], seed=3)
    model.save_pretrained(tmp_path / "adapter")
    lora.merge_adapter(ModelConfig(name_or_path=tiny_assets["model"], dtype="fp32"), str(tmp_path / "adapter"),
                       str(tmp_path / "merged"))

    def load(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    # (from_pretrained puts the adapter into the base model it is given: a copy of its own)
    reloaded = PeftModel.from_pretrained(load(tiny_assets["model"]), str(tmp_path / "adapter")).eval()
    merged = load(str(tmp_path / "merged"))
    assert not any("lora" in name for name, _ in merged.named_parameters())  # a plain model
    ids = torch.tensor([[5, 9, 17, 33, 2, 41, 8]])
    with torch.no_grad():
        want, got = reloaded(input_ids=ids).logits, merged(input_ids=ids).logits
        assert (want - load(tiny_assets["model"])(input_ids=ids).logits).abs().max() > 1e-3  # the adapter mattered
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_param_counts_on_the_meta_model_match_the_loaded_model(tiny_assets):
    from ray_dpo import lora

    section = LoraSection(rank=4, target_modules=["q_proj", "v_proj"])
    meta = lora.param_counts(lora.wrap(lora.meta_model(tiny_assets["model"]), section))
    from transformers import AutoModelForCausalLM

    real = lora.wrap(AutoModelForCausalLM.from_pretrained(tiny_assets["model"]), section)
    assert meta == lora.param_counts(real)
    trainable, total = meta
    # rank 4 on q and v of each layer: (in + out) * 4 parameters per adapted layer
    layers = real.base_model.model.config.num_hidden_layers
    hidden = real.base_model.model.config.hidden_size
    kv = real.base_model.model.model.layers[0].self_attn.v_proj.base_layer.out_features
    assert trainable == layers * 4 * ((hidden + hidden) + (hidden + kv))
    assert total > trainable


def test_merged_tensors_are_peft_merge_under_plain_names_and_leave_the_model_alone(tiny_assets):
    """What policy.lora.sync=merged sends: the plain model's state dict with every adapter
    merged in (peft's merge_and_unload, computed on copies)."""
    import contextlib
    import copy

    from ray_dpo import lora

    model = _adapted(tiny_assets["model"], seed=5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sent = lora.merged_tensors(model, gather=lambda params: contextlib.nullcontext())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # training weights untouched

    want = {n: p for n, p in copy.deepcopy(model).merge_and_unload().named_parameters()}
    assert set(sent) == set(want)
    for name, tensor in want.items():
        assert torch.allclose(sent[name], tensor, atol=1e-6, rtol=0), name


def test_adapters_train_under_gradient_checkpointing(tiny_assets):
    """model.gradient_checkpointing (non-reentrant, as the worker enables it) with frozen base
    weights: the adapters still get gradients, the base none."""
    from transformers import AutoModelForCausalLM

    from ray_dpo import lora

    model = AutoModelForCausalLM.from_pretrained(tiny_assets["model"], dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = lora.wrap(model, LoraSection(rank=4))
    model.train()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.01)  # B = 0 would leave A without gradient
    model(input_ids=torch.tensor([[5, 9, 17, 33, 2, 41]])).logits.logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_" in n)
    assert all(g is None for n, g in grads.items() if "lora_" not in n)
