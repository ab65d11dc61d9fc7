"""Tiny offline assets: deterministic data, a learnable preference, tokenizer and model that load."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_dpo.data.formats import normalize_row
from ray_dpo.testing.assets import (
    BAD_WORDS,
    GOOD_WORDS,
    INSTRUCTION_WORDS,
    NEUTRAL_WORDS,
    VOCABULARY,
    judge_score,
    make_preference_rows,
    make_tiny_assets,
    write_dataset,
)


def test_word_classes_are_disjoint():
    classes = [set(GOOD_WORDS), set(BAD_WORDS), set(NEUTRAL_WORDS), set(INSTRUCTION_WORDS)]
    assert sum(map(len, classes)) == len(VOCABULARY) == len(set().union(*classes))


def test_rows_are_deterministic_for_a_seed():
    assert make_preference_rows(50, seed=3) == make_preference_rows(50, seed=3)
    assert make_preference_rows(50, seed=3) != make_preference_rows(50, seed=4)
    conv = make_preference_rows(50, seed=3, fmt="conversational")
    assert [r["prompt"][0]["content"] for r in conv] == [r["prompt"] for r in make_preference_rows(50, seed=3)]


@pytest.mark.parametrize("fmt", ["standard", "conversational"])
def test_rows_have_the_promised_shape(fmt):
    for row in make_preference_rows(300, seed=0, fmt=fmt):
        pair = normalize_row(row)  # valid for the row normaliser, chosen != rejected
        assert pair.is_chat == (fmt == "conversational")
        text = (lambda x: x if isinstance(x, str) else x[0]["content"])
        prompt_words = text(pair.prompt).split()
        assert prompt_words[0] in INSTRUCTION_WORDS
        assert set(prompt_words[1:]) <= set(NEUTRAL_WORDS)
        for response in (pair.chosen, pair.rejected):
            assert 3 <= len(text(response).split()) <= 12


def test_judge_prefers_chosen_on_at_least_95_percent_of_pairs():
    rows = make_preference_rows(1000, seed=7)
    wins = sum(judge_score(r["prompt"], r["chosen"]) > judge_score(r["prompt"], r["rejected"]) for r in rows)
    assert wins >= 950
    # Noisy, not trivial: some chosen responses contain non-good words.
    assert any(judge_score(r["prompt"], r["chosen"]) < 1.0 for r in rows)


def test_judge_score_is_the_fraction_of_good_words():
    assert judge_score("p", "bright dull river calm") == 0.5
    assert judge_score("p", "Bright, calm!") == 1.0
    assert judge_score("p", "") == 0.0
    assert judge_score([{"role": "user", "content": "p"}], "dull") == 0.0


def test_write_dataset_is_deterministic_and_sharded(tmp_path):
    a = write_dataset(tmp_path / "a", n_train=11, n_eval=4, seed=5, shards=3)
    b = write_dataset(tmp_path / "b", n_train=11, n_eval=4, seed=5, shards=3)
    assert [Path(p).name for p in a["train_files"]] == ["train-00000.jsonl", "train-00001.jsonl", "train-00002.jsonl"]
    for pa, pb in zip(a["train_files"] + [a["eval_file"]], b["train_files"] + [b["eval_file"]]):
        assert Path(pa).read_bytes() == Path(pb).read_bytes()
    lines = [Path(p).read_text().splitlines() for p in a["train_files"]]
    assert [len(x) for x in lines] == [3, 4, 4]
    train = [json.loads(line) for shard in lines for line in shard]
    evals = [json.loads(line) for line in Path(a["eval_file"]).read_text().splitlines()]
    key = lambda r: (r["prompt"], r["chosen"])  # noqa: E731
    assert len(evals) == 4 and not set(map(key, evals)) & set(map(key, train))
    # eval does not depend on n_train; another seed gives other data
    c = write_dataset(tmp_path / "c", n_train=2, n_eval=4, seed=5, shards=1)
    assert Path(c["eval_file"]).read_bytes() == Path(a["eval_file"]).read_bytes()
    d = write_dataset(tmp_path / "d", n_train=11, n_eval=4, seed=6, shards=3)
    assert Path(d["train_files"][0]).read_bytes() != Path(a["train_files"][0]).read_bytes()


def test_tiny_assets_layout(tiny_assets):
    for key in ("tokenizer", "model", "data"):
        assert Path(tiny_assets[key]).is_dir()
    assert [Path(p).name for p in tiny_assets["train_files"]] == ["train-00000.jsonl", "train-00001.jsonl"]
    n_train = sum(len(Path(p).read_text().splitlines()) for p in tiny_assets["train_files"])
    assert n_train == 512
    assert len(Path(tiny_assets["eval_file"]).read_text().splitlines()) == 128
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"} <= set(
        os.listdir(tiny_assets["model"]))


@pytest.mark.parametrize("where", ["tokenizer", "model"])
def test_tokenizer_round_trip(tiny_assets, where):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets[where])
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<|pad|>", "<|bos|>", "<|eos|>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = " ".join(VOCABULARY)
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(VOCABULARY) + 1
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok("zebra", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    messages = [{"role": "user", "content": "describe the river"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": "calm"}], tokenize=False)
    assert full.startswith(prompt) and full[len(prompt):] == "calm<|eos|>\n"  # prefix-stable


def test_model_loads_with_all_weights(tiny_assets):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets["model"])
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["model"])
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.vocab_size == len(tok)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 0)
    assert cfg.max_position_embeddings == 512
    # 2 heads of 32: vLLM's CPU attention needs head_dim >= 32 (tests/ray/test_generation.py)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 2)
    assert cfg.head_dim == 32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    saved = load_file(str(Path(tiny_assets["model"]) / "model.safetensors"))
    state = model.state_dict()
    for name, tensor in saved.items():  # every saved tensor really got loaded
        assert torch.equal(state[name], tensor), name
    batch = tok(["describe the river", "list"], return_tensors="pt", padding=True)
    logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_model_is_deterministic_for_a_seed(tiny_assets, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from ray_dpo.testing.assets import build_tiny_model

    tok = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    again = build_tiny_model(tmp_path / "m0", tok, seed=0)
    other = build_tiny_model(tmp_path / "m1", tok, seed=1)
    name = "model.safetensors"
    assert (Path(again) / name).read_bytes() == (Path(tiny_assets["model"]) / name).read_bytes()
    w0 = load_file(str(Path(again) / name))["model.embed_tokens.weight"]
    w1 = load_file(str(Path(other) / name))["model.embed_tokens.weight"]
    assert not (w0 == w1).all()


def test_make_tiny_assets_is_idempotent(tiny_assets):
    manifest = Path(tiny_assets["root"]) / "assets.json"
    before = manifest.stat().st_mtime_ns
    assert make_tiny_assets(tiny_assets["root"]) == tiny_assets
    assert manifest.stat().st_mtime_ns == before  # reused, not rebuilt


def test_make_tiny_assets_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not a tiny-assets directory"):
        make_tiny_assets(tmp_path, n_train=4, n_eval=2)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_make_tiny_assets_rebuilds_when_parameters_change(tmp_path):
    first = make_tiny_assets(tmp_path / "t", n_train=4, n_eval=2, seed=0)
    second = make_tiny_assets(tmp_path / "t", n_train=6, n_eval=2, seed=0)
    assert second["root"] == first["root"]
    assert sum(len(Path(p).read_text().splitlines()) for p in second["train_files"]) == 6
    assert [p.name for p in tmp_path.iterdir()] == ["t"]  # no build leftovers


def test_make_tiny_assets_rebuilds_a_build_from_an_older_version(tmp_path):
    """A cached build from before head_dim 32 (manifest version 1, 4 heads of 16) is replaced."""
    first = make_tiny_assets(tmp_path / "t", n_train=4, n_eval=2)
    manifest = Path(first["root"]) / "assets.json"
    old = {"version": 1, "n_train": 4, "n_eval": 2, "seed": 0, "fmt": "standard", "shards": 2}
    manifest.write_text(json.dumps({"params": old}))
    config_path = Path(first["model"]) / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "num_attention_heads": 4}))
    assert make_tiny_assets(tmp_path / "t", n_train=4, n_eval=2) == first
    assert json.loads(config_path.read_text())["num_attention_heads"] == 2
    assert json.loads(manifest.read_text())["params"] != old


def test_importing_assets_and_judge_stays_light():
    code = ("import sys, ray_dpo.testing.assets\n"
            "print(','.join(m for m in ('torch', 'transformers', 'ray', 'deepspeed', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
