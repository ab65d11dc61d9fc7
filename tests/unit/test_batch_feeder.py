"""ray_dpo.feeder in-process (no Ray cluster): step layout, determinism, resume, prefetch, errors.

BatchFeeder is driven directly with a fake reference (ray_dpo.testing.feeder_fakes): fast and
deterministic. tests/ray/test_feeder.py runs it as the Ray actor of start_feeder.
"""

from __future__ import annotations

import collections
import threading
import time

import pytest

from ray_dpo.feeder import BatchFeeder, BatchPlan, Gate, PairStore, Prefetch
from ray_dpo.testing.feeder_fakes import FakeReference, fake_logps, make_rows, plan_of


def fetch_all(feeder, step):
    """{rank: micro-batches} of one step."""
    return {rank: feeder.get_step(step, rank) for rank in range(feeder.plan.num_workers)}


def step_ids(step_batches):
    return [row["pair_id"] for batches in step_batches.values() for mb in batches for row in mb]


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("n, workers, mbs, gas", [
    (23, 2, 2, 3),  # G=12: one full and one partial step (11) per epoch
    (5, 3, 1, 2),   # G=6 > N: a single partial step, empty micro-batches
    (16, 1, 4, 2),  # exact multiple
])
def test_every_pair_exactly_once_per_epoch(n, workers, mbs, gas):
    rows = make_rows(n)
    feeder = BatchFeeder(rows, plan_of(num_workers=workers, micro_batch_size=mbs,
                                       gradient_accumulation_steps=gas), reference=FakeReference())
    spe = feeder.steps_per_epoch()
    assert spe == -(-n // (workers * mbs * gas)) and feeder.total_steps() == 2 * spe
    by_id = {r["pair_id"]: r for r in rows}
    for epoch in range(2):
        seen = []
        for step in range(epoch * spe, (epoch + 1) * spe):
            batches = fetch_all(feeder, step)
            sizes = [len(mb) for rank in batches.values() for mb in rank]
            assert all(len(rank) == gas for rank in batches.values())
            assert max(sizes) - min(sizes) <= 1 and max(sizes) <= mbs
            assert sum(sizes) == feeder.num_pairs_in_step(step)
            assert step_ids(batches) != [] and set(step_ids(batches)) == set(feeder.step_pair_ids(step))
            for rank in batches.values():
                for mb in rank:
                    for row in mb:
                        src = by_id[row["pair_id"]]
                        assert {k: row[k] for k in src} == src
                        assert (row["ref_chosen_logp"], row["ref_rejected_logp"]) == fake_logps(src)
            seen += step_ids(batches)
        assert sorted(seen) == sorted(by_id) and len(seen) == n  # once each, none dropped
    if n < workers * mbs * gas:
        assert any(len(mb) == 0 for mb in feeder.get_step(0, workers - 1))


@pytest.mark.parametrize("workers, gas, world", [(4, 1, 3), (4, 2, 1), (3, 2, 2), (2, 3, 1)])
def test_fewer_ranks_train_the_same_pairs_per_step_in_more_micro_batches(workers, gas, world):
    """An elastic group that lost ranks: each step has the pairs it has at full size, every
    micro-batch still at most micro_batch_size pairs, every rank the same count of them."""
    mbs = 2
    rows = make_rows(41)
    plan = plan_of(num_workers=workers, micro_batch_size=mbs, gradient_accumulation_steps=gas)
    feeder = BatchFeeder(rows, plan, reference=FakeReference())
    accumulation = plan.accumulation(world)
    assert accumulation == -(-workers * gas // world) and plan.accumulation() == gas
    for step in range(feeder.total_steps()):
        batches = {rank: feeder.get_step(step, rank, world) for rank in range(world)}
        assert all(len(rank) == accumulation for rank in batches.values())
        assert max(len(mb) for rank in batches.values() for mb in rank) <= mbs
        assert sorted(step_ids(batches)) == sorted(feeder.step_pair_ids(step))
    with pytest.raises(ValueError, match=r"world must be in \[1, %d\]" % workers):
        feeder.get_step(0, 0, workers + 1)
    with pytest.raises(ValueError, match="rank must be in"):
        feeder.get_step(0, world, world)


def test_a_shrunk_group_moves_the_prefetch_window_without_the_ranks_it_lost():
    """Rank 1 of 2 is gone (its node lost); rank 0 alone trains on: the window follows it,
    so steps ahead are scored before rank 0 asks for them."""
    rows = make_rows(64)
    reference = FakeReference()
    feeder = BatchFeeder(rows, plan_of(num_workers=2, micro_batch_size=2), reference=reference,
                         prefetch=Prefetch(steps=2))
    try:
        for step in range(3):
            feeder.get_step(step, 0, 2)  # rank 1 never asks (it died at step 0)
        feeder.get_step(3, 0, 1)  # the restarted group: one rank
        ahead = {pid for s in (4, 5) for pid in feeder.step_pair_ids(s)}
        deadline = time.monotonic() + 10
        while not ahead <= set(reference.scored) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ahead <= set(reference.scored)
        assert feeder.stats()["steps_served"] == 1  # step 3, by the one rank there is
    finally:
        feeder.close()



def test_order_is_deterministic_and_reshuffled_each_epoch():
    rows = make_rows(40)
    a = BatchFeeder(rows, plan_of(num_epochs=3), reference=FakeReference())
    b = BatchFeeder(rows, plan_of(num_epochs=3), reference=FakeReference())
    spe = a.steps_per_epoch()
    for step in range(a.total_steps()):
        assert fetch_all(a, step) == fetch_all(b, step)
    orders = [sum((a.step_pair_ids(s) for s in range(e * spe, (e + 1) * spe)), []) for e in range(3)]
    assert orders[0] != orders[1] != orders[2] and sorted(orders[0]) == sorted(orders[1])
    other_seed = BatchFeeder(rows, plan_of(seed=8), reference=FakeReference())
    assert other_seed.step_pair_ids(0) != a.step_pair_ids(0)
    in_order = BatchFeeder(rows, plan_of(shuffle=False), reference=FakeReference())
    for epoch in range(2):
        served = sum((in_order.step_pair_ids(s) for s in range(epoch * spe, (epoch + 1) * spe)), [])
        assert served == [r["pair_id"] for r in rows]  # file order, every epoch


def test_resume_from_step_k_gives_the_uninterrupted_rows():
    rows = make_rows(30)
    plan = plan_of(num_epochs=3)
    full = BatchFeeder(rows, plan, reference=FakeReference())
    expected = [fetch_all(full, s) for s in range(full.total_steps())]
    for k, start_step in ((4, 0), (3, 3)):  # a resumed run may or may not say where it starts
        resumed = BatchFeeder(rows, plan, reference=FakeReference(),
                              prefetch=Prefetch(start_step=start_step))
        assert [fetch_all(resumed, s) for s in range(k, resumed.total_steps())] == expected[k:]
        resumed.close()


def test_total_steps_max_steps_and_plan_validation():
    rows = make_rows(23)
    assert BatchFeeder(rows, plan_of(num_epochs=3), reference=FakeReference()).total_steps() == 6
    capped = BatchFeeder(rows, plan_of(num_epochs=3, max_steps=4), reference=FakeReference())
    assert capped.total_steps() == 4 and capped.num_pairs_in_step(3) == 11
    with pytest.raises(ValueError, match=r"step must be in \[0, 4\), got 4"):
        capped.get_step(4, 0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        capped.get_step(0, 2)
    with pytest.raises(ValueError, match="num_workers=0 .*; micro_batch_size=-1 .*; max_steps=0"):
        BatchPlan(num_workers=0, micro_batch_size=-1, max_steps=0)
    assert plan_of().global_batch == 12
    with pytest.raises(ValueError, match="no training pairs"):
        BatchFeeder([], plan_of(), reference=FakeReference())
    with pytest.raises(ValueError, match="prefetch_steps must be >= 0, got -1"):
        Prefetch(steps=-1)


# --------------------------------------------------------------------------- reference log-probs


def test_ref_cache_is_served_and_must_be_complete_without_reference():
    rows = make_rows(10)
    cache = {r["pair_id"]: (float(i), float(-i)) for i, r in enumerate(rows)}
    feeder = BatchFeeder(rows, plan_of(), ref_cache=cache)
    for rank, batches in fetch_all(feeder, 0).items():
        for row in (row for mb in batches for row in mb):
            assert (row["ref_chosen_logp"], row["ref_rejected_logp"]) == cache[row["pair_id"]]
    assert feeder.stats()["ref_batches_scored"] == 0
    del cache["f.jsonl:4"]
    with pytest.raises(ValueError, match=r"1 pair\(s\) have no reference log-probs in ref_cache"):
        BatchFeeder(rows, plan_of(), ref_cache=cache)
    reference = FakeReference()  # a partial cache plus a group: only the gap is scored
    partial = BatchFeeder(rows, plan_of(num_epochs=1), ref_cache=cache, reference=reference)
    fetch_all(partial, 0)
    assert reference.scored == ["f.jsonl:4"]


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_prefetch_runs_ahead_but_stays_bounded():
    rows = make_rows(60)
    reference = FakeReference(delay=0.02)
    plan = plan_of(num_epochs=1, micro_batch_size=1, gradient_accumulation_steps=2)  # G=4, 15 steps
    feeder = BatchFeeder(rows, plan, reference=reference, prefetch=Prefetch(steps=2, batch_size=2))
    fetch_all(feeder, 0)
    ahead = {pid for s in range(3) for pid in feeder.step_pair_ids(s)}  # steps 0, 1, 2
    assert wait_until(lambda: set(reference.scored) == ahead)
    time.sleep(0.3)
    assert set(reference.scored) == ahead  # bounded: step 3 waits for the workers
    wait_before = feeder.stats()["wait_seconds"]
    fetch_all(feeder, 1)
    assert feeder.stats()["wait_seconds"] == wait_before  # step 1 was ready: no waiting
    assert wait_until(lambda: len(reference.scored) == 16)  # the window moved to step 3
    stats = feeder.stats()
    assert stats["steps_served"] == 2 and stats["get_step_calls"] == 4
    assert stats["ref_pairs_scored"] == 16 and stats["ref_batches_scored"] == 8
    assert len(reference.scored) == len(set(reference.scored))  # nothing scored twice
    feeder.close()


def test_one_slow_rank_holds_the_window_and_every_rank_gets_its_step():
    rows = make_rows(40)
    reference = FakeReference(delay=0.01)
    feeder = BatchFeeder(rows, plan_of(num_epochs=1, micro_batch_size=1, gradient_accumulation_steps=1),
                         reference=reference, prefetch=Prefetch(steps=1))  # G=2, 20 steps
    results = collections.defaultdict(dict)

    def worker(rank, steps):
        for step in steps:
            results[rank][step] = feeder.get_step(step, rank)

    threads = [threading.Thread(target=worker, args=(0, range(20))),
               threading.Thread(target=worker, args=(1, range(20)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    served = [row["pair_id"] for rank in results.values() for batches in rank.values()
              for mb in batches for row in mb]
    assert sorted(served) == sorted(r["pair_id"] for r in rows)


def test_a_held_prefetch_scores_only_the_steps_asked_for_until_its_gate_opens():
    """prefetch_after: the window waits for the gate (another feeder's train_sent); a step a
    rank waits for is scored at once. train_sent opens when every train pair has been sent."""
    rows = make_rows(20)
    reference = FakeReference(delay=0.01)
    plan = plan_of(num_epochs=2, micro_batch_size=1, gradient_accumulation_steps=2)  # G=4: 5 steps an epoch
    gate = Gate()
    feeder = BatchFeeder(rows, plan, reference=reference, prefetch=Prefetch(steps=2), prefetch_after=gate)
    time.sleep(0.2)
    assert reference.scored == [] and not feeder.train_sent.is_open(), "held: nothing ahead is scored"
    fetch_all(feeder, 3)  # both ranks wait for step 3: scored although the gate is shut
    assert set(reference.scored) == set(feeder.step_pair_ids(3))
    time.sleep(0.2)
    assert set(reference.scored) == set(feeder.step_pair_ids(3)), "still held: steps 4 and 5 wait"
    gate.open()
    window = {pid for s in range(3, 6) for pid in feeder.step_pair_ids(s)}  # steps 3..5 (5: epoch 1's first)
    assert wait_until(lambda: set(reference.scored) == window)
    assert not feeder.train_sent.is_open(), "steps 0..2's pairs of epoch 0 are not sent yet"
    fetch_all(feeder, 0)
    assert wait_until(lambda: feeder.train_sent.is_open())
    assert sorted(reference.scored) == sorted(r["pair_id"] for r in rows), "every pair once"
    feeder.close()

    cached = BatchFeeder(rows, plan, ref_cache={r["pair_id"]: fake_logps(r) for r in rows})
    assert cached.train_sent.is_open(), "nothing to send"
    unscored = BatchFeeder(rows, plan, reference=FakeReference(), prefetch_after=Gate())
    unscored.close()
    assert unscored.train_sent.is_open(), "a closed feeder sends nothing more"


@pytest.mark.parametrize("fail_at", [0, 2])
def test_scoring_error_reaches_get_step_callers(fail_at):
    rows = make_rows(24)
    feeder = BatchFeeder(rows, plan_of(num_epochs=1, gradient_accumulation_steps=1),
                         reference=FakeReference(fail_at=fail_at), prefetch=Prefetch(steps=0, batch_size=2))
    # G=4: batches of 2, so batch 2 is the first of step 1.
    if fail_at:
        fetch_all(feeder, 0)
    errors = []

    def call(rank):
        try:
            feeder.get_step(fail_at // 2, rank)
        except RuntimeError as err:
            errors.append(str(err))

    threads = [threading.Thread(target=call, args=(rank,)) for rank in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert errors == [f"reference exploded on batch {fail_at}"] * 2  # both ranks, never hangs
    with pytest.raises(RuntimeError, match="reference exploded"):
        feeder.get_step(5, 0)  # sticky: later steps fail the same way


def test_eval_micro_batches_and_lazy_reference():
    rows, eval_rows = make_rows(10), make_rows(7, seed=1, prefix="eval.jsonl")
    reference = FakeReference()
    feeder = BatchFeeder(rows, plan_of(num_epochs=1), reference=reference, evaluation=eval_rows,
                         prefetch=Prefetch(steps=0))
    fetch_all(feeder, 0)
    assert not any(p.startswith("eval") for p in reference.scored)  # lazy: not before asked
    per_rank = [feeder.get_eval(rank) for rank in range(2)]
    assert [[len(mb) for mb in batches] for batches in per_rank] == [[2, 2], [2, 1]]
    served = {row["pair_id"]: row for batches in per_rank for mb in batches for row in mb}
    assert sorted(served) == sorted(r["pair_id"] for r in eval_rows)
    assert all((r["ref_chosen_logp"], r["ref_rejected_logp"]) == fake_logps(r) for r in served.values())
    scored = len(reference.scored)
    assert feeder.get_eval(0) == per_rank[0] and len(reference.scored) == scored  # computed once
    limited = BatchFeeder(rows, plan_of(), reference=FakeReference(), evaluation=eval_rows, eval_max_pairs=3)
    assert sum(len(mb) for rank in range(2) for mb in limited.get_eval(rank)) == 3


def test_pair_ids_shared_by_train_and_eval_must_be_the_same_pair():
    rows = make_rows(4)
    clash = make_rows(2, seed=5)  # same ids "f.jsonl:1", "f.jsonl:2", other tokens
    cache = {r["pair_id"]: (0.0, 0.0) for r in rows}
    with pytest.raises(ValueError, match="pair id 'f.jsonl:1' names different pairs in train and eval"):
        BatchFeeder(rows, plan_of(), ref_cache=cache, evaluation=clash)
    BatchFeeder(rows, plan_of(), ref_cache=cache, evaluation=rows[:2])  # same file in both: fine


def test_pair_store_is_compact_and_round_trips():
    rows = make_rows(50)
    store = PairStore.from_source(rows)
    assert [store.row(i) for i in range(50)] == rows
    tokens = sum(len(r[c]) for r in rows for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
    assert store.tokens.dtype.itemsize == 4 and store.nbytes <= 4 * tokens + 50 * (24 + 8 + 12 + 1) + 64
