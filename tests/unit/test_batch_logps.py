"""ray_dpo.batching.padded and .logps against naive one-sequence-at-a-time references."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import ray_dpo.batching
from ray_dpo.batching.logps import mean_nll, sequence_logps
from ray_dpo.batching.padded import concat_pairs, split_pairs

PAD = 0


def random_pairs(rng: random.Random, n_pairs: int, vocab: int) -> list[dict]:
    """Pairs with random lengths; ids in 1..vocab-1 so PAD=0 never appears as a real token."""

    def ids(lo: int, hi: int) -> list[int]:
        return [rng.randrange(1, vocab) for _ in range(rng.randint(lo, hi))]

    return [
        {"pair_id": f"p:{i}", "prompt_ids": ids(1, 7), "chosen_ids": ids(1, 6), "rejected_ids": ids(1, 9)}
        for i in range(n_pairs)
    ]


def rows_of(pairs: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt, response) per row, in concat_pairs order: all chosen, then all rejected."""
    return [(p["prompt_ids"], p["chosen_ids"]) for p in pairs] + [
        (p["prompt_ids"], p["rejected_ids"]) for p in pairs
    ]


def naive_logp(seq_logits: torch.Tensor, seq: list[int], n_prompt: int) -> float:
    """Unpadded single sequence: seq_logits [n, V] scores seq[1:]; sum response log-probs."""
    logp = torch.log_softmax(seq_logits.double(), dim=-1)
    return sum(logp[j - 1, seq[j]].item() for j in range(n_prompt, len(seq)))


@pytest.mark.parametrize("module", sorted(Path(ray_dpo.batching.__file__).parent.glob("*.py")), ids=lambda p: p.stem)
def test_batching_modules_are_pure(module):
    tree = ast.parse(module.read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"ray", "deepspeed", "vllm", "transformers"}


# --- concat_pairs -----------------------------------------------------------------------


def test_concat_pairs_layout():
    pairs = [
        {"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8, 9, 10]},
        {"prompt_ids": [11], "chosen_ids": [12, 13], "rejected_ids": [14]},
    ]
    batch = concat_pairs(pairs, pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 0, 0],  # pair 0 chosen
        [11, 12, 13, 0, 0],  # pair 1 chosen
        [5, 6, 8, 9, 10],  # pair 0 rejected
        [11, 14, 0, 0, 0],  # pair 1 rejected
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 0, 0, 0],
    ]
    assert batch["loss_mask"].tolist() == [
        [False, False, True, False, False],
        [False, True, True, False, False],
        [False, False, True, True, True],
        [False, True, False, False, False],
    ]
    assert batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].dtype == torch.long
    assert batch["loss_mask"].dtype == torch.bool


def test_concat_pairs_pad_to_multiple_and_array_inputs():
    pairs = [{"prompt_ids": np.array([3, 4]), "chosen_ids": np.array([5]), "rejected_ids": [6, 7, 8]}]
    batch = concat_pairs(pairs, pad_token_id=-1, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][1].tolist() == [3, 4, 6, 7, 8, -1, -1, -1]
    assert batch["attention_mask"].sum().item() == 3 + 5


@pytest.mark.parametrize("key", ["prompt_ids", "chosen_ids", "rejected_ids"])
def test_concat_pairs_rejects_empty_segments(key):
    pair = {"pair_id": "train.jsonl:7", "prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}
    pair[key] = []
    with pytest.raises(ValueError, match=f"pair train.jsonl:7: {key} is empty"):
        concat_pairs([pair], pad_token_id=PAD)


def test_concat_pairs_rejects_no_pairs():
    with pytest.raises(ValueError, match="at least one pair"):
        concat_pairs([], pad_token_id=PAD)


# --- sequence_logps ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sequence_logps_matches_naive_per_sequence(seed):
    rng = random.Random(seed)
    vocab = 23
    pairs = random_pairs(rng, n_pairs=5, vocab=vocab)
    batch = concat_pairs(pairs, pad_token_id=PAD, pad_to_multiple_of=4)
    torch.manual_seed(seed)
    logits = 3 * torch.randn(*batch["input_ids"].shape, vocab)

    logps, n_tokens = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])

    assert logps.dtype == torch.float32 and logps.shape == (10,)
    expected, expected_n = [], []
    for i, (prompt, response) in enumerate(rows_of(pairs)):
        seq = list(prompt) + list(response)
        expected.append(naive_logp(logits[i, : len(seq)], seq, len(prompt)))
        expected_n.append(len(response))
    torch.testing.assert_close(logps, torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=0)
    assert n_tokens.tolist() == expected_n


def test_prompt_and_padding_positions_do_not_matter():
    # Logits that score prompt tokens (and those at/after padding) must not change the result;
    # an out-of-vocabulary pad id must not be gathered.
    rng = random.Random(3)
    vocab = 11
    pairs = random_pairs(rng, n_pairs=3, vocab=vocab)
    batch = concat_pairs(pairs, pad_token_id=-100)
    torch.manual_seed(3)
    logits = torch.randn(*batch["input_ids"].shape, vocab)
    base, _ = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])

    scrambled = logits.clone()
    for i, (prompt, response) in enumerate(rows_of(pairs)):
        n_p, n = len(prompt), len(prompt) + len(response)
        scrambled[i, : n_p - 1] = 1e4 * torch.randn(n_p - 1, vocab)  # predict prompt tokens 1..n_p-1
        scrambled[i, n - 1 :] = 1e4 * torch.randn(logits.shape[1] - n + 1, vocab)  # predict padding
    again, _ = sequence_logps(scrambled, batch["input_ids"], batch["loss_mask"])
    torch.testing.assert_close(again, base, atol=0, rtol=0)


def test_sequence_logps_bf16_logits_are_scored_in_float32():
    rng = random.Random(4)
    pairs = random_pairs(rng, n_pairs=2, vocab=50)
    batch = concat_pairs(pairs, pad_token_id=PAD)
    torch.manual_seed(4)
    logits = (4 * torch.randn(*batch["input_ids"].shape, 50)).bfloat16()
    got, _ = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
    ref, _ = sequence_logps(logits.float(), batch["input_ids"], batch["loss_mask"])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_sequence_logps_gradient_only_reaches_scored_positions():
    batch = concat_pairs([{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]}], PAD)
    logits = torch.randn(2, 4, 6, requires_grad=True)
    logps, _ = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
    logps.sum().backward()
    touched = logits.grad.abs().sum(-1) > 0  # [N, T]: which positions' logits got gradient
    # row 0 [1,2,3,pad]: only position 1 (predicts 3); row 1 [1,2,4,5]: positions 1, 2
    assert touched.tolist() == [[False, True, False, False], [False, True, True, False]]


def test_sequence_logps_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        sequence_logps(torch.zeros(2, 5, 7), torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.bool))


# --- helpers ------------------------------------------------------------------------------


def test_mean_nll():
    # −(−6)/3 = 2, −(−1.5)/1 = 1.5, empty sequence → 0 rather than NaN
    got = mean_nll(torch.tensor([-6.0, -1.5, 0.0]), torch.tensor([3, 1, 0]))
    torch.testing.assert_close(got, torch.tensor([2.0, 1.5, 0.0]))


def test_split_pairs():
    chosen, rejected = split_pairs(torch.arange(6))
    assert chosen.tolist() == [0, 1, 2] and rejected.tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="even leading dimension"):
        split_pairs(torch.arange(5))


# --- a real causal LM -------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny_llama(request):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, attn_implementation=request.param,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_padded_batch_forward_matches_each_sequence_alone(tiny_llama):
    rng = random.Random(5)
    pairs = random_pairs(rng, n_pairs=4, vocab=97)
    batch = concat_pairs(pairs, pad_token_id=PAD, pad_to_multiple_of=8)
    with torch.no_grad():
        logits = tiny_llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps, n_tokens = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])

        expected = []
        for prompt, response in rows_of(pairs):
            seq = list(prompt) + list(response)
            alone = tiny_llama(input_ids=torch.tensor([seq])).logits[0]
            expected.append(naive_logp(alone, seq, len(prompt)))

    torch.testing.assert_close(logps, torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=0)
    assert n_tokens.tolist() == [len(r) for _, r in rows_of(pairs)]
    chosen, rejected = split_pairs(logps)
    assert chosen.shape == rejected.shape == (4,)
