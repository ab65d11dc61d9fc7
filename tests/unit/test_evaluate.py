"""`ray-dpo eval` without Ray: bad input (exit 2), the pair metrics' arithmetic, --chat on the tiny model.

The evaluation itself (engines, reference actors, MLflow) is tests/ray/test_eval_command.py.
"""

from __future__ import annotations

import io
import math

import pytest

CONFIG = "configs/tiny-cpu.yaml"


def tiny_sets(tiny_assets, tmp_path, **extra) -> list[str]:
    values = {"model.name_or_path": tiny_assets["model"], "data.train_files": f"[{tiny_assets['train_glob']}]",
              "data.eval_files": f"[{tiny_assets['eval_file']}]", "run.storage_path": str(tmp_path / "runs"), **extra}
    return [arg for k, v in values.items() for arg in ("--set", f"{k}={v}")]


def test_a_missing_model_path_is_exit_2_naming_it(tiny_assets, tmp_path, capsys):
    from ray_dpo.cli import main

    missing = tmp_path / "no-such-model"
    assert main(["eval", CONFIG, "--model", str(missing), *tiny_sets(tiny_assets, tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--model {missing}: no such directory" in err
    assert "hf_model/" in err and "adapter_config.json" in err  # what to pass instead
    assert not (tmp_path / "runs").exists(), "nothing started, nothing logged"


def test_a_directory_that_is_no_model_is_exit_2(tiny_assets, tmp_path, capsys):
    from ray_dpo.cli import main

    assert main(["eval", CONFIG, "--model", str(tmp_path), *tiny_sets(tiny_assets, tmp_path)]) == 2
    assert "holds neither config.json" in capsys.readouterr().err


def test_a_config_without_held_out_prompts_or_eval_pairs_is_exit_2(tiny_assets, tmp_path, capsys):
    from ray_dpo.cli import main

    sets = tiny_sets(tiny_assets, tmp_path, **{"data.eval_files": "[]"})
    assert main(["eval", CONFIG, "--model", tiny_assets["model"], *sets]) == 2
    err = capsys.readouterr().err
    assert "eval.prompts_file" in err and "data.eval_files" in err and "--set eval.prompts_file=" in err


def test_eval_forwards_are_the_feeders_eval_micro_batches_of_every_rank():
    from ray_dpo.evaluate import eval_forwards

    # rank 0 holds rows 0, 2, 4, 6, 8; rank 1 rows 1, 3, 5, 7, 9; micro-batches of 2
    assert eval_forwards(10, num_workers=2, micro_batch_size=2) == [[0, 2, 1, 3], [4, 6, 5, 7], [8, 9]]
    assert eval_forwards(3, num_workers=2, micro_batch_size=8) == [[0, 2, 1]]
    assert eval_forwards(0, num_workers=2, micro_batch_size=8) == []


def test_pair_metrics_are_the_dpo_numbers_by_hand():
    from ray_dpo.config import LossConfig
    from ray_dpo.evaluate import eval_pair_metrics

    rows = [{"prompt_ids": [1], "chosen_ids": [5, 6], "rejected_ids": [7]} for _ in range(3)]
    policy = [(-1.0, -3.0), (-2.0, -1.0), (-4.0, -4.5)]
    ref = [(-1.5, -2.5), (-2.0, -2.0), (-4.0, -4.0)]
    beta = 0.1
    got = eval_pair_metrics(LossConfig(type="sigmoid", beta=beta), rows, policy, ref, num_workers=2,
                            micro_batch_size=1)
    h = [(pc - rc) - (pr - rr) for (pc, pr), (rc, rr) in zip(policy, ref)]
    margins = [beta * x for x in h]
    assert got["eval/rewards/margins"] == pytest.approx(sum(margins) / 3, abs=1e-6)
    assert got["eval/rewards/accuracies"] == pytest.approx(sum(m > 0 for m in margins) / 3)
    loss = sum(math.log1p(math.exp(-beta * x)) for x in h) / 3
    assert got["eval/loss"] == pytest.approx(loss, abs=1e-6)
    assert got["eval/logps/chosen"] == pytest.approx(-7.0 / 3, abs=1e-6)


def test_pair_metrics_of_a_reference_free_loss_need_no_reference():
    from ray_dpo.config import LossConfig
    from ray_dpo.evaluate import eval_pair_metrics

    rows = [{"prompt_ids": [1], "chosen_ids": [5, 6], "rejected_ids": [7]}]
    got = eval_pair_metrics(LossConfig(type="simpo", beta=2.0, gamma=0.5), rows, [(-1.0, -3.0)], None,
                            num_workers=1, micro_batch_size=8)
    assert got["eval/rewards/margins"] == pytest.approx(2.0 * (-1.0 / 2 - -3.0 / 1))
    assert got["eval/rewards/accuracies"] == 1.0


def test_kto_pair_metrics_take_z_ref_per_forward_over_every_rank():
    from ray_dpo.config import LossConfig
    from ray_dpo.evaluate import eval_pair_metrics

    rows = [{"prompt_ids": [1], "chosen_ids": [5], "rejected_ids": [6], "label": label}
            for label in (True, False, True, False)]
    policy = [(-1.0, -1.0), (-2.0, -1.5), (-1.0, -3.0), (-2.0, -1.0)]
    ref = [(-1.5, -2.0), (-1.0, -2.0), (-1.0, -3.0), (-2.0, -2.0)]
    got = eval_pair_metrics(LossConfig(type="kto", beta=0.1), rows, policy, ref, num_workers=2, micro_batch_size=1)
    # forward 0: rows 0 (rank 0) and 1 (rank 1); forward 1: rows 2 and 3
    z = [max(0.0, ((-1.0 + 2.0) + (-1.5 + 2.0)) / 2), max(0.0, (0.0 + 1.0) / 2)]
    ratios = [p[0] - r[0] for p, r in zip(policy, ref)]  # 0.5, -1.0, 0.0, 0.0
    kl = [z[0], z[0], z[1], z[1]]
    correct = [ratios[0] > kl[0], ratios[1] < kl[1], ratios[2] > kl[2], ratios[3] < kl[3]]
    assert got["eval/rewards/accuracies"] == pytest.approx(sum(correct) / 4)
    assert got["eval/kto/kl"] == pytest.approx(sum(kl) / 4)


def test_chat_answers_each_line_with_the_models_reply(tiny_assets, tmp_path, monkeypatch, capsys):
    """stdin lines in, one reply line each out; /reset starts the conversation (and its seeds)
    over, so the same first line gets the same reply; the reply is the model's own generate."""
    from ray_dpo.cli import main
    from ray_dpo.config import load_config
    from ray_dpo.engines.spec import heldout_sampling
    from ray_dpo.evaluate import load_chat_model, reply

    sets = tiny_sets(tiny_assets, tmp_path, **{"online.sampling.max_new_tokens": 8})
    monkeypatch.setattr("sys.stdin", io.StringIO("sketch boat evening\n\n/reset\nsketch boat evening\n"
                                                 "explain paper chair\n"))
    assert main(["eval", CONFIG, "--model", tiny_assets["model"], "--chat", *sets]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[0] == out[1] and out[0], out

    cfg = load_config(CONFIG, [s for s in sets if s != "--set"])
    tokenizer, model = load_chat_model(cfg, tiny_assets["model"])
    expected = reply(tokenizer, model, [{"role": "user", "content": "sketch boat evening"}],
                     sampling=heldout_sampling(cfg), seed=cfg.run.seed)
    assert out[0] == expected
    assert len(tokenizer(out[0], add_special_tokens=False)["input_ids"]) <= 8


def test_a_lora_adapter_directory_is_merged_into_its_base_for_the_eval(tiny_assets, tmp_path):
    """An adapter/ directory (adapter_config.json) becomes a plain model directory in scratch
    space, computing what base + adapter computes, and is removed afterwards."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ray_dpo import lora
    from ray_dpo.config import LoraSection, load_config
    from ray_dpo.evaluate import check_inputs, plain_model

    torch.manual_seed(0)
    wrapped = lora.wrap(AutoModelForCausalLM.from_pretrained(tiny_assets["model"]), LoraSection(rank=4))
    for name, param in wrapped.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)  # a trained adapter: not the zero it starts at
    adapter = tmp_path / "adapter"
    wrapped.save_pretrained(str(adapter))
    cfg = load_config(CONFIG, [s for s in tiny_sets(tiny_assets, tmp_path) if s != "--set"])
    assert check_inputs(cfg, str(adapter)) == str(adapter)

    ids = torch.tensor([[1, 10, 20, 30, 40]])
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_assets["model"]), str(adapter))
    with torch.no_grad():
        expected = peft_model(ids).logits
    with plain_model(cfg, str(adapter), scratch=str(tmp_path / "scratch")) as merged:
        assert not (tmp_path / "scratch" / "adapter_config.json").exists()
        with torch.no_grad():
            got = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_assets["model"])
        with torch.no_grad():
            assert (base(ids).logits - expected).abs().max() > 1e-3, "the adapter changes the model"
        assert torch.allclose(got, expected, atol=1e-5)
        assert (tmp_path / "scratch").exists() and merged.startswith(str(tmp_path / "scratch"))
    assert not any((tmp_path / "scratch").iterdir()), "the merged copy is removed"
