"""Online round planning: step plan, sync points, prompt sampling, pair rows (pure, no Ray)."""

from collections import Counter

import pytest

from ray_dpo.online.pairs import ScoredPair
from ray_dpo.online.rounds import RoundPlan, pair_rows, plan_rounds, round_prompt_indices, sync_points

# --------------------------------------------------------------------------- plan_rounds


@pytest.mark.parametrize("prompts,batch,epochs,rounds,per_round", [
    (64, 8, 1, 2, 8),     # divides evenly
    (10, 4, 2, 3, 6),     # ceil(10/4) = 3 steps, twice
    (3, 16, 1, 4, 1),     # fewer prompts than one batch: still one step
    (17, 16, 3, 1, 6),    # ceil(17/16) = 2 steps, three epochs
])
def test_steps_per_round_is_ceil_prompts_over_batch_times_epochs(prompts, batch, epochs, rounds, per_round):
    plan = plan_rounds(num_rounds=rounds, prompts_per_round=prompts, global_batch=batch, num_epochs=epochs)
    assert plan == RoundPlan(rounds=rounds, steps_per_round=per_round, total_steps=rounds * per_round)
    assert plan.rounds_run == rounds


def test_round_of_and_round_start():
    plan = plan_rounds(num_rounds=3, prompts_per_round=10, global_batch=4, num_epochs=2)  # S = 6
    assert [plan.round_of(s) for s in (0, 5, 6, 11, 12, 17)] == [0, 0, 1, 1, 2, 2]
    assert [plan.round_start(r) for r in range(3)] == [0, 6, 12]


@pytest.mark.parametrize("max_steps,total,rounds_run", [
    (7, 7, 2),      # cuts round 1 short, round 2 never runs
    (12, 12, 2),    # exactly two full rounds
    (1, 1, 1),
    (18, 18, 3),    # equal to the plan: no cut
    (100, 18, 3),   # larger than the plan: no effect
    (None, 18, 3),
])
def test_max_steps_caps_the_total(max_steps, total, rounds_run):
    plan = plan_rounds(num_rounds=3, prompts_per_round=10, global_batch=4, num_epochs=2, max_steps=max_steps)
    assert plan.steps_per_round == 6  # the cap never changes the round length
    assert plan.total_steps == total
    assert plan.rounds_run == rounds_run


@pytest.mark.parametrize("kwargs,key", [
    (dict(num_rounds=0), "online.rounds"),
    (dict(prompts_per_round=0), "online.prompts_per_round"),
    (dict(global_batch=0), "global batch"),
    (dict(num_epochs=0), "policy.num_epochs"),
    (dict(num_rounds=-2), "online.rounds"),
])
def test_bad_plan_values_raise_naming_the_key(kwargs, key):
    args = dict(num_rounds=2, prompts_per_round=8, global_batch=4, num_epochs=1) | kwargs
    with pytest.raises(ValueError, match=f"{key} must be >= 1, got {list(kwargs.values())[0]}"):
        plan_rounds(**args)


# --------------------------------------------------------------------------- sync_points


def test_online_only_syncs_at_round_starts_not_at_the_end():
    assert sync_points(total_steps=18, steps_per_round=6, eval_every=0, eval_sampling=False) == [0, 6, 12]
    # eval_every alone does not add points without held-out sampling
    assert sync_points(total_steps=18, steps_per_round=6, eval_every=5, eval_sampling=False) == [0, 6, 12]


def test_online_sync_points_follow_a_max_steps_cut():
    # plan of 3 rounds x 6 steps cut to 7 steps: rounds 0 and 1 start, round 2 never does
    assert sync_points(total_steps=7, steps_per_round=6, eval_every=0, eval_sampling=False) == [0, 6]


def test_eval_only_syncs_at_zero_multiples_and_the_end():
    assert sync_points(total_steps=10, steps_per_round=None, eval_every=5, eval_sampling=True) == [0, 5, 10]
    assert sync_points(total_steps=10, steps_per_round=None, eval_every=0, eval_sampling=True) == [0, 10]
    assert sync_points(total_steps=10, steps_per_round=None, eval_every=0, eval_sampling=False) == []


def test_eval_every_that_does_not_divide_the_total():
    assert sync_points(total_steps=10, steps_per_round=None, eval_every=4, eval_sampling=True) == [0, 4, 8, 10]
    assert sync_points(total_steps=10, steps_per_round=None, eval_every=25, eval_sampling=True) == [0, 10]


def test_online_and_eval_points_are_merged_sorted_without_duplicates():
    # round starts {0, 4, 8}; eval {0, 6, 12}
    assert sync_points(total_steps=12, steps_per_round=4, eval_every=6, eval_sampling=True) == [0, 4, 6, 8, 12]
    # round starts {0, 6, 12}; eval {0, 4, 8, 12, 16, 18}
    points = sync_points(total_steps=18, steps_per_round=6, eval_every=4, eval_sampling=True)
    assert points == [0, 4, 6, 8, 12, 16, 18]


# --------------------------------------------------------------------------- round_prompt_indices


def test_prompt_indices_are_deterministic_for_a_seed():
    first = [round_prompt_indices(50, per_round=8, round_index=r, seed=3) for r in range(4)]
    again = [round_prompt_indices(50, per_round=8, round_index=r, seed=3) for r in range(4)]
    assert first == again
    assert all(len(r) == 8 and all(0 <= i < 50 for i in r) for r in first)


def test_different_seeds_pick_different_prompts():
    a = round_prompt_indices(50, per_round=20, round_index=0, seed=0)
    b = round_prompt_indices(50, per_round=20, round_index=0, seed=1)
    assert a != b


def test_each_pass_is_a_fresh_permutation():
    passes = [round_prompt_indices(50, per_round=50, round_index=r, seed=0) for r in range(3)]
    assert all(sorted(p) == list(range(50)) for p in passes)
    assert passes[0] != passes[1] != passes[2]
    assert passes[0] != list(range(50))  # shuffled, not the data set order


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_rounds_cover_every_prompt_before_any_repeats(seed):
    rounds = [round_prompt_indices(10, per_round=4, round_index=r, seed=seed) for r in range(5)]
    assert all(len(r) == 4 for r in rounds)
    stream = [i for r in rounds for i in r]  # 20 indices: two full passes over 10 prompts
    assert sorted(stream[:10]) == list(range(10))
    assert sorted(stream[10:]) == list(range(10))
    assert not set(rounds[0]) & set(rounds[1])  # within one pass: no repeat
    assert not set(rounds[3]) & set(rounds[4])


def test_a_round_never_samples_the_same_prompt_twice_when_there_are_enough_prompts():
    # 10 prompts, 4 per round: round 2 takes the last 2 of pass 0 and the first 2 of pass 1.
    # The two passes are independent permutations, so without care the same prompt can be in
    # both halves: sampled twice in one round, two pairs with the same pair_id
    # ("online-r2:<prompt id>"), one prompt trained twice in that round.
    for seed in range(20):
        r2 = round_prompt_indices(10, per_round=4, round_index=2, seed=seed)
        assert len(set(r2)) == 4, f"seed {seed}: round 2 = {r2} repeats a prompt"


def test_more_per_round_than_prompts_cycles_through_passes():
    got = round_prompt_indices(3, per_round=7, round_index=0, seed=5)
    assert len(got) == 7
    assert sorted(got[:3]) == [0, 1, 2] and sorted(got[3:6]) == [0, 1, 2]
    assert sorted(Counter(got).values()) == [2, 2, 3]
    # round 1 continues the stream: it starts at index 7 = pass 2, offset 1
    nxt = round_prompt_indices(3, per_round=7, round_index=1, seed=5)
    assert len(nxt) == 7 and set(nxt) == {0, 1, 2}


def test_no_prompts_raises():
    with pytest.raises(ValueError, match="no prompts"):
        round_prompt_indices(0, per_round=4, round_index=0, seed=0)


# --------------------------------------------------------------------------- pair_rows

BOS, EOS = 1, 2


def _pair(pid, prompt, chosen, rejected):
    return ScoredPair(pair_id=pid, prompt=prompt, chosen=chosen, rejected=rejected, chosen_score=1.0, rejected_score=0.0)


def _pairs():
    return [
        _pair("r0:a", [BOS, 10, 11], [20, EOS], [21, 22, EOS]),              # fits
        _pair("r0:b", [BOS] + list(range(10, 20)), [20, EOS], [21, EOS]),     # prompt 11 > 8
        _pair("r0:c", [BOS, 10], [20, 21, EOS], [20, 21, EOS]),               # identical
        _pair("r0:d", [BOS, 10], list(range(30, 50)), [21, EOS]),             # 2 + 20 > 16
    ]


def test_pair_rows_fit_like_data_rows_and_keep_pair_ids():
    rows, counters = pair_rows(_pairs(), max_length=16, max_prompt_length=8, over_length="truncate_prompt",
                               bos_id=BOS)
    assert counters == {"rows": 3, "truncated": 2, "dropped_length": 1}
    assert [r["pair_id"] for r in rows] == ["r0:a", "r0:b", "r0:d"]
    a, b, d = rows
    assert a == {"pair_id": "r0:a", "prompt_ids": [BOS, 10, 11], "chosen_ids": [20, EOS],
                 "rejected_ids": [21, 22, EOS], "truncated": False}
    # BOS stays in front, then the last 7 of the 10 prompt tokens
    assert b["prompt_ids"] == [BOS, 13, 14, 15, 16, 17, 18, 19] and b["truncated"] is True
    assert (b["chosen_ids"], b["rejected_ids"]) == ([20, EOS], [21, EOS])
    # responses cut to 16 - 2 = 14 tokens
    assert d["chosen_ids"] == list(range(30, 44)) and d["rejected_ids"] == [21, EOS] and d["truncated"] is True
    assert counters["rows"] + counters["dropped_length"] == len(_pairs())


def test_pair_rows_drop_policy_drops_and_counts():
    rows, counters = pair_rows(_pairs(), max_length=16, max_prompt_length=8, over_length="drop", bos_id=BOS)
    assert [r["pair_id"] for r in rows] == ["r0:a"]
    assert counters == {"rows": 1, "truncated": 0, "dropped_length": 3}
    assert counters["rows"] + counters["dropped_length"] == 4


def test_pair_rows_truncate_response_drops_long_prompts_but_cuts_responses():
    rows, counters = pair_rows(_pairs(), max_length=16, max_prompt_length=8, over_length="truncate_response",
                               bos_id=BOS)
    assert [r["pair_id"] for r in rows] == ["r0:a", "r0:d"]
    assert counters == {"rows": 2, "truncated": 1, "dropped_length": 2}


def test_pair_rows_take_tuples_and_return_lists():
    rows, counters = pair_rows([_pair("t", (BOS, 10), (20, EOS), (21, EOS))], max_length=16, max_prompt_length=8,
                               over_length="truncate_prompt", bos_id=BOS)
    assert counters == {"rows": 1, "truncated": 0, "dropped_length": 0}
    assert rows[0]["prompt_ids"] == [BOS, 10] and isinstance(rows[0]["chosen_ids"], list)


def test_pair_rows_without_bos_cut_the_prompt_from_the_left():
    rows, _ = pair_rows([_pair("n", list(range(10, 20)), [20, EOS], [21, EOS])], max_length=16,
                        max_prompt_length=4, over_length="truncate_prompt", bos_id=None)
    assert rows[0]["prompt_ids"] == [16, 17, 18, 19]


def test_pair_rows_of_nothing():
    assert pair_rows([], max_length=16, max_prompt_length=8, over_length="drop", bos_id=BOS) == (
        [], {"rows": 0, "truncated": 0, "dropped_length": 0})
