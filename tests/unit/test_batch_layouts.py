"""ray_dpo.batching.layouts and .budget: every layout gives the padded layout's log-probs
and gradients.

A tiny random LlamaForCausalLM (fp32, seeded) scores the same random pairs in each layout;
the padded baseline is `padded.concat_pairs` + `logps.sequence_logps`, untouched.
"""

from __future__ import annotations

import random

import pytest
import torch

from ray_dpo import compat
from ray_dpo.batching.budget import micro_batch_cost, token_budget_micro_batches
from ray_dpo.batching.layouts import ROLE_PAD, ROLE_PROMPT, batch_stats, build_batch, model_inputs, pair_logps
from ray_dpo.batching.logps import sequence_logps
from ray_dpo.batching.padded import concat_pairs, split_pairs

PAD = 0
VOCAB = 97
ATTN = ["eager", "sdpa"]
# Row capacities: one row for everything, rows smaller than some sequences, a middle one.
CAPACITIES = [None, 9, 40]


def random_pairs(seed: int, n_pairs: int, *, prompt=(1, 12), response=(1, 10)) -> list[dict]:
    """Pairs with random lengths (length-1 responses included); ids 1..VOCAB-1, never PAD."""
    rng = random.Random(seed)

    def ids(lo_hi: tuple[int, int]) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(rng.randint(*lo_hi))]

    pairs = [
        {"pair_id": f"p:{i}", "prompt_ids": ids(prompt), "chosen_ids": ids(response), "rejected_ids": ids(response)}
        for i in range(n_pairs)
    ]
    # make sure the edge cases are there: length-1 chosen, rejected and prompt
    for pair, key in zip(pairs, ["chosen_ids", "rejected_ids", "prompt_ids"]):
        pair[key] = pair[key][:1]
    return pairs


@pytest.fixture(scope="module")
def models():
    """attn_implementation -> the same tiny Llama (identical weights), fp32, eval mode."""
    transformers = pytest.importorskip("transformers")
    out = {}
    for attn in ATTN:
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn,
            # The default 0.02 init gives near-uniform logits: a wrong mask would then move
            # the log-probs by less than the tolerance. 0.2 makes every token matter.
            initializer_range=0.2,
        )  # fmt: skip
        torch.manual_seed(0)
        out[attn] = transformers.LlamaForCausalLM(config).eval()
    return out


def baseline_logps(model, pairs):
    """The padded baseline exactly as batching.padded documents it: (chosen, rejected, n_c, n_r)."""
    batch = concat_pairs(pairs, PAD)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, n_tokens = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
    return (*split_pairs(logps), *split_pairs(n_tokens))


def layout_logps(model, pairs, layout, capacity=None, **inputs_kwargs):
    batch = build_batch(pairs, layout=layout, pad_token_id=PAD, max_tokens_per_row=capacity)
    kwargs = model_inputs(batch, attn_implementation=compat.attn_implementation(model.config), **inputs_kwargs)
    return pair_logps(model(**kwargs).logits, batch)


# --- equality with the padded baseline ---------------------------------------------------


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("layout", ["padded", "packed", "prefix_shared"])
@pytest.mark.parametrize("capacity", CAPACITIES)
def test_layout_logps_equal_padded_baseline(models, attn, layout, capacity):
    pairs = random_pairs(seed=1, n_pairs=9)
    with torch.no_grad():
        want = baseline_logps(models[attn], pairs)
        got = layout_logps(models[attn], pairs, layout, capacity)
    # rtol 1e-6: sums of ~50 nats in float32 have a 3.8e-6 ulp, and the baseline sums
    # in another order than pair_logps' index_add
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-6)
    assert torch.equal(got[2], want[2]) and torch.equal(got[3], want[3])
    assert got[2].tolist() == [len(p["chosen_ids"]) for p in pairs]


@pytest.mark.parametrize("attn", ATTN)
def test_gradients_equal_across_layouts(models, attn):
    model = models[attn]
    pairs = random_pairs(seed=2, n_pairs=7)

    def grads(layout, capacity):
        model.zero_grad(set_to_none=True)
        chosen, rejected, _, _ = layout_logps(model, pairs, layout, capacity)
        (chosen.sum() - 0.5 * rejected.sum()).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    want = grads("padded", None)
    assert max(g.abs().max().item() for g in want.values()) > 1e-2  # a test with teeth
    for layout, capacity in [("packed", None), ("packed", 20), ("prefix_shared", None), ("prefix_shared", 20)]:
        got = grads(layout, capacity)
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=f"{layout}: {name}")


def test_masks_matter(models):
    """Guards the equality tests: breaking the prefix rule or the packing changes the numbers."""
    model = models["sdpa"]
    pairs = random_pairs(seed=3, n_pairs=5)
    with torch.no_grad():
        want = baseline_logps(model, pairs)
        batch = build_batch(pairs, layout="prefix_shared", pad_token_id=PAD)
        seg, T = batch.segment_ids, batch.input_ids.shape[1]
        causal_in_segment = (seg[:, :, None] == seg[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
        leaky = batch.attention_mask | causal_in_segment.unsqueeze(1)  # rejected now sees chosen
        inputs = dict(model_inputs(batch), attention_mask=leaky)
        chosen, rejected, _, _ = pair_logps(model(**inputs).logits, batch)
        packed = build_batch(pairs, layout="packed", pad_token_id=PAD)
        unmasked, _, _, _ = pair_logps(model(input_ids=packed.input_ids).logits, packed)
    torch.testing.assert_close(chosen, want[0], atol=1e-5, rtol=0)  # chosen never sees rejected
    assert (rejected - want[1]).abs().max() > 1e-2
    assert (unmasked - want[0]).abs().max() > 1e-2


@pytest.mark.parametrize("attn", ATTN)
def test_implicit_packing_from_position_ids_needs_use_cache_false(models, attn):
    """Pins transformers 5.19 (docs/architecture.md, "Batch layouts"): attention_mask=None + restarting
    position_ids give the block-diagonal mask (find_packed_sequence_indices) only without a
    cache; with the default use_cache=True the sequences of a row silently mix."""
    model = models[attn]
    pairs = random_pairs(seed=4, n_pairs=6)
    batch = build_batch(pairs, layout="packed", pad_token_id=PAD, max_tokens_per_row=30)
    assert model_inputs(batch, attn_implementation=attn)["use_cache"] is False
    ids, pos = batch.input_ids, batch.position_ids
    with torch.no_grad():
        explicit = pair_logps(model(**model_inputs(batch, attn_implementation=attn)).logits, batch)
        implicit = pair_logps(model(input_ids=ids, position_ids=pos, use_cache=False).logits, batch)
        with_cache = pair_logps(model(input_ids=ids, position_ids=pos).logits, batch)
    torch.testing.assert_close(implicit[0], explicit[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(implicit[1], explicit[1], atol=1e-5, rtol=0)
    assert (with_cache[0] - explicit[0]).abs().max() > 1e-2


def test_eager_needs_an_additive_float_mask(models):
    """eager adds the 4D mask to the scores: a bool mask is silently wrong, so model_inputs
    converts it to 0 / finfo.min in the model's dtype."""
    model = models["eager"]
    pairs = random_pairs(seed=5, n_pairs=4)
    batch = build_batch(pairs, layout="prefix_shared", pad_token_id=PAD)
    mask = model_inputs(batch, attn_implementation="eager", dtype=torch.bfloat16)["attention_mask"]
    R, T = batch.input_ids.shape
    assert mask.dtype == torch.bfloat16 and mask.shape == (R, 1, T, T)
    assert set(mask.unique().tolist()) == {0.0, torch.finfo(torch.bfloat16).min}
    assert torch.equal(mask == 0, batch.attention_mask)
    with torch.no_grad():
        want = baseline_logps(model, pairs)
        bool_inputs = model_inputs(batch, attn_implementation="sdpa")  # eager adds it as 0/1
        wrong, _, _, _ = pair_logps(model(**bool_inputs).logits, batch)
    assert (wrong - want[0]).abs().max() > 1e-2


def test_flash_inputs_are_one_flat_row_and_pair_logps_accepts_flat_logits(models):
    """GPU path (flash varlen) is not testable on CPU CI; check the input shapes and that
    [1, R*T, V] logits score like [R, T, V]."""
    pairs = random_pairs(seed=6, n_pairs=5)
    batch = build_batch(pairs, layout="packed", pad_token_id=PAD, max_tokens_per_row=25)
    inputs = model_inputs(batch, attn_implementation="flash_attention_2")
    R, T = batch.input_ids.shape
    assert set(inputs) == {"input_ids", "position_ids", "use_cache"} and inputs["input_ids"].shape == (1, R * T)
    # every sequence (and every row tail) starts at position 0: what cu_seqlens is built from
    starts = (inputs["position_ids"][0] == 0).sum().item()
    n_tails = sum(int((row == ROLE_PAD).any()) for row in batch.token_roles)
    assert starts == 2 * len(pairs) + n_tails
    with torch.no_grad():
        logits = models["sdpa"](**model_inputs(batch)).logits
    flat = pair_logps(logits.reshape(1, R * T, -1), batch)
    assert all(torch.equal(a, b) for a, b in zip(flat, pair_logps(logits, batch)))


# --- layout structure ----------------------------------------------------------------------


def test_padded_layout_is_concat_pairs():
    pairs = random_pairs(seed=7, n_pairs=5)
    batch = build_batch(pairs, layout="padded", pad_token_id=PAD)
    want = concat_pairs(pairs, PAD)
    assert torch.equal(batch.input_ids, want["input_ids"])
    assert torch.equal(model_inputs(batch)["attention_mask"], want["attention_mask"])
    assert batch_stats(batch) == (int(want["attention_mask"].sum()), want["input_ids"].numel())


def test_prefix_shared_positions_mask_and_predictors_by_hand():
    pair = {"prompt_ids": [11, 12], "chosen_ids": [21, 22], "rejected_ids": [31, 32, 33]}
    batch = build_batch([pair], layout="prefix_shared", pad_token_id=PAD)
    assert batch.input_ids.tolist() == [[11, 12, 21, 22, 31, 32, 33]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4]]
    #                      p0 p1 c0 c1 r0 r1 r2   (keys)
    want = torch.tensor([[1, 0, 0, 0, 0, 0, 0],  # p0
                         [1, 1, 0, 0, 0, 0, 0],  # p1
                         [1, 1, 1, 0, 0, 0, 0],  # c0
                         [1, 1, 1, 1, 0, 0, 0],  # c1
                         [1, 1, 0, 0, 1, 0, 0],  # r0: prompt, itself, never chosen
                         [1, 1, 0, 0, 1, 1, 0],  # r1
                         [1, 1, 0, 0, 1, 1, 1]], dtype=torch.bool)  # fmt: skip
    assert torch.equal(batch.attention_mask[0, 0], want)
    assert batch.chosen_target.tolist() == [2, 3] and batch.chosen_predictor.tolist() == [1, 2]
    # the first rejected token is predicted by the last prompt token, not by c1
    assert batch.rejected_target.tolist() == [4, 5, 6] and batch.rejected_predictor.tolist() == [1, 4, 5]


def test_packed_rows_restart_positions_and_keep_sequences_apart():
    pairs = [
        {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]},
        {"prompt_ids": [6], "chosen_ids": [7], "rejected_ids": [8]},
    ]
    batch = build_batch(pairs, layout="packed", pad_token_id=PAD)  # one row, input order
    assert batch.input_ids.tolist() == [[1, 2, 3, 1, 2, 4, 5, 6, 7, 6, 8]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 1]]
    mask = batch.attention_mask[0, 0]
    assert mask[3, :3].sum() == 0 and mask[6, 3:7].all() and mask[6, :3].sum() == 0
    assert batch_stats(batch) == (11, 11)
    # with a row capacity: first-fit decreasing, longest sequence first; pads attend to themselves
    batch = build_batch(pairs, layout="packed", pad_token_id=PAD, max_tokens_per_row=5)
    assert batch.input_ids.tolist() == [[1, 2, 4, 5, 0], [1, 2, 3, 6, 7], [6, 8, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch.attention_mask[2, 0, 2:, :].tolist() == [[0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]
    assert batch_stats(batch) == (11, 15)


def test_prefix_shared_computes_each_prompt_once():
    pairs = random_pairs(seed=8, n_pairs=20)
    prompt_tokens = sum(len(p["prompt_ids"]) for p in pairs)
    response_tokens = sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    prompt_positions = {}
    for layout in ["padded", "packed", "prefix_shared"]:
        batch = build_batch(pairs, layout=layout, pad_token_id=PAD, max_tokens_per_row=64)
        prompt_positions[layout] = int((batch.token_roles == ROLE_PROMPT).sum())
        if layout == "prefix_shared":
            assert batch_stats(batch).real_tokens == prompt_tokens + response_tokens
    assert prompt_positions == {"padded": 2 * prompt_tokens, "packed": 2 * prompt_tokens, "prefix_shared": prompt_tokens}


def test_a_sequence_longer_than_the_row_gets_a_row_of_its_own():
    pairs = random_pairs(seed=9, n_pairs=4)
    pairs[3]["chosen_ids"] = list(range(1, 60))
    batch = build_batch(pairs, layout="packed", pad_token_id=PAD, max_tokens_per_row=16)
    long_len = len(pairs[3]["prompt_ids"]) + 59
    assert batch.input_ids.shape[1] == long_len
    rows_with_it = [r for r in range(batch.input_ids.shape[0]) if (batch.input_ids[r] == 59).any()]
    assert len(rows_with_it) == 1 and (batch.segment_ids[rows_with_it[0]] <= 0).all()
    assert batch_stats(batch).real_tokens == micro_batch_cost(pairs, layout="packed")


def realistic_pairs(n_pairs: int) -> list[dict]:
    """Chat-like lengths: prompts 16..600, responses mostly short with a long tail (1..900)."""
    rng = random.Random(10)

    def ids(n: int) -> list[int]:
        return [rng.randrange(1, VOCAB) for _ in range(n)]

    def response_len() -> int:
        return max(1, min(900, int(rng.lognormvariate(4.5, 1.0))))

    return [
        {"prompt_ids": ids(rng.randint(16, 600)), "chosen_ids": ids(response_len()), "rejected_ids": ids(response_len())}
        for _ in range(n_pairs)
    ]


def test_packed_padding_only_in_row_tails_and_high_real_token_share():
    pairs = realistic_pairs(256)
    packed = build_batch(pairs, layout="packed", pad_token_id=PAD, max_tokens_per_row=4096)
    padded = build_batch(pairs, layout="padded", pad_token_id=PAD)
    real = packed.token_roles != ROLE_PAD
    # no padding inside a row: each row is real tokens, then (possibly) a pad tail
    assert torch.equal(real, real.int().cummin(dim=1).values.bool())
    stats, padded_stats = batch_stats(packed), batch_stats(padded)
    assert stats.real_tokens == padded_stats.real_tokens == micro_batch_cost(pairs, layout="packed")
    assert stats.real_tokens / stats.padded_positions >= 0.95, stats
    assert stats.padded_positions < padded_stats.padded_positions
    assert padded_stats.padding_fraction > 0.3  # what packing removes on this mix


def test_packed_computes_fewer_positions_than_padded_on_small_pairs():
    pairs = random_pairs(seed=11, n_pairs=16)
    for capacity in CAPACITIES:
        packed = batch_stats(build_batch(pairs, layout="packed", pad_token_id=PAD, max_tokens_per_row=capacity))
        padded = batch_stats(build_batch(pairs, layout="padded", pad_token_id=PAD))
        assert packed.padded_positions < padded.padded_positions


# --- token-budget batching -------------------------------------------------------------


@pytest.mark.parametrize("layout", ["padded", "packed", "prefix_shared"])
@pytest.mark.parametrize("max_tokens", [30, 100, 400])
def test_token_budget_micro_batches(layout, max_tokens):
    pairs = random_pairs(seed=12, n_pairs=40, prompt=(1, 20), response=(1, 15))
    pairs[5]["chosen_ids"] = list(range(1, 80))  # over every budget below 400 in any layout
    plan = token_budget_micro_batches(pairs, max_tokens=max_tokens, layout=layout)
    # order-stable, every pair exactly once, never empty
    assert [p["pair_id"] for mb in plan.micro_batches for p in mb] == [p["pair_id"] for p in pairs]
    assert all(plan.micro_batches)
    for i, mb in enumerate(plan.micro_batches):
        cost = micro_batch_cost(mb, layout=layout)
        if i in plan.oversized:
            assert len(mb) == 1 and cost > max_tokens
        else:
            assert cost <= max_tokens
        # greedy: the next pair did not fit
        if i + 1 < len(plan.micro_batches):
            assert micro_batch_cost(mb + plan.micro_batches[i + 1][:1], layout=layout) > max_tokens
        # the cost model is what build_batch computes (one row when the row holds the budget)
        batch = build_batch(mb, layout=layout, pad_token_id=PAD, max_tokens_per_row=max(cost, max_tokens))
        assert batch_stats(batch).padded_positions == cost
    oversized_ids = [plan.micro_batches[i][0]["pair_id"] for i in plan.oversized]
    assert ("p:5" in oversized_ids) == (micro_batch_cost([pairs[5]], layout=layout) > max_tokens)


def test_prefix_shared_budget_fits_more_pairs_than_padded():
    pairs = realistic_pairs(64)
    n_batches = {
        layout: len(token_budget_micro_batches(pairs, max_tokens=16384, layout=layout).micro_batches)
        for layout in ["padded", "packed", "prefix_shared"]
    }
    assert n_batches["prefix_shared"] < n_batches["packed"] < n_batches["padded"]


# --- errors ----------------------------------------------------------------------------


def test_errors_say_how_to_fix():
    pairs = random_pairs(seed=13, n_pairs=2)
    with pytest.raises(ValueError, match="valid layouts: packed, padded, prefix_shared"):
        build_batch(pairs, layout="ragged", pad_token_id=PAD)
    with pytest.raises(ValueError, match="valid layouts"):
        token_budget_micro_batches(pairs, max_tokens=10, layout="ragged")
    with pytest.raises(ValueError, match="pair p:1: rejected_ids is empty"):
        build_batch([pairs[0], dict(pairs[1], rejected_ids=[])], layout="packed", pad_token_id=PAD)
    with pytest.raises(ValueError, match="at least one pair"):
        build_batch([], layout="packed", pad_token_id=PAD)
    with pytest.raises(ValueError, match="max_tokens_per_row must be >= 1"):
        build_batch(pairs, layout="packed", pad_token_id=PAD, max_tokens_per_row=0)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        token_budget_micro_batches(pairs, max_tokens=0, layout="packed")
    prefix = build_batch(pairs, layout="prefix_shared", pad_token_id=PAD)
    with pytest.raises(ValueError, match="use attn_implementation='sdpa' or 'eager'"):
        model_inputs(prefix, attn_implementation="flash_attention_2")
    with pytest.raises(ValueError, match="'flex_attention' is not supported"):
        model_inputs(prefix, attn_implementation="flex_attention")
    with pytest.raises(ValueError, match=r"do not match the batch's \[R, T\]"):
        pair_logps(torch.zeros(1, 3, VOCAB), prefix)
