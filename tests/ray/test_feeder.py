"""ray_dpo.feeder: step layout, determinism, resume, prefetch and errors.

Most tests drive BatchFeeder in-process with a fake reference (fast, deterministic); the
last ones run it as the Ray actor of start_feeder, with a real ReferenceGroup.
"""

from __future__ import annotations

import collections
import random
import threading
import time

import pytest

from ray_dpo.feeder import BatchFeeder, BatchPlan, PairStore

pytestmark = pytest.mark.ray


def make_rows(n, *, seed=0, prefix="f.jsonl", vocab=100):
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(7, vocab) for _ in range(rng.randint(lo, hi))]

    return [{"pair_id": f"{prefix}:{i + 1}", "prompt_ids": ids(1, 6), "chosen_ids": ids(1, 8),
             "rejected_ids": ids(1, 8), "truncated": i % 5 == 0} for i in range(n)]


def fake_logps(row):
    return -0.5 * sum(row["chosen_ids"]) - 0.25, -0.5 * sum(row["rejected_ids"]) - 0.75


class FakeReference:
    """score_batches like ReferenceGroup's, with deterministic values; records what it scored.

    fail_at: raise on this (0-based) batch; delay: seconds per batch.
    """

    def __init__(self, *, delay=0.0, fail_at=None):
        self.delay = delay
        self.fail_at = fail_at
        self.scored: list[str] = []
        self.batches = 0

    def score_batches(self, batches):
        for batch in batches:
            if self.fail_at is not None and self.batches >= self.fail_at:
                raise RuntimeError(f"reference exploded on batch {self.batches}")
            time.sleep(self.delay)
            self.batches += 1
            self.scored += [r["pair_id"] for r in batch]
            out = []
            for row in batch:
                c, r = fake_logps(row)
                out.append({**row, "ref_chosen_logp": c, "ref_rejected_logp": r})
            yield out


def plan_of(**kw):
    base = dict(num_workers=2, micro_batch_size=2, gradient_accumulation_steps=3, num_epochs=2,
                max_steps=None, seed=7, shuffle=True)
    return BatchPlan(**{**base, **kw})


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
        resumed = BatchFeeder(rows, plan, reference=FakeReference(), start_step=start_step)
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
    feeder = BatchFeeder(rows, plan, reference=reference, prefetch_steps=2, ref_batch_size=2)
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
                         reference=reference, prefetch_steps=1)  # G=2, 20 steps
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


@pytest.mark.parametrize("fail_at", [0, 2])
def test_scoring_error_reaches_get_step_callers(fail_at):
    rows = make_rows(24)
    feeder = BatchFeeder(rows, plan_of(num_epochs=1, gradient_accumulation_steps=1),
                         reference=FakeReference(fail_at=fail_at), prefetch_steps=0, ref_batch_size=2)
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
                         prefetch_steps=0)
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


# --------------------------------------------------------------------------- as a Ray actor


@pytest.fixture(scope="module")
def reference_group(ray_cluster, tiny_assets):
    from ray_dpo.config import ReferenceConfig
    from ray_dpo.reference import ReferenceGroup

    group = ReferenceGroup(model_path=tiny_assets["model"], dtype="fp32", use_gpu=False,
                           config=ReferenceConfig(num_actors=1, batch_size=4, max_in_flight=2),
                           name_prefix="test-feeder-ref", restart_timeout_s=120)
    yield group
    group.shutdown()


def test_actor_with_reference_group_matches_direct_computation(ray_cluster, tiny_assets, reference_group):
    import ray

    from ray_dpo.feeder import start_feeder
    from ray_dpo.reference import ReferenceActor

    rows = make_rows(14, vocab=120)
    eval_rows = make_rows(5, seed=3, prefix="eval.jsonl", vocab=120)
    local = ReferenceActor(tiny_assets["model"], dtype="fp32", device="cpu")
    expected = {}
    for batch in (rows, eval_rows):
        out = local.log_probs(batch)
        expected.update({r["pair_id"]: (c, x) for r, c, x in
                         zip(batch, out["ref_chosen_logp"], out["ref_rejected_logp"])})

    plan = plan_of(num_epochs=2, gradient_accumulation_steps=2)  # G=8: steps of 8 and 6 pairs
    feeder = start_feeder(train=ray.data.from_items(rows), plan=plan, reference=reference_group,
                          evaluation=eval_rows)
    total = ray.get(feeder.total_steps.remote())
    assert total == 4
    by_id = {r["pair_id"]: r for r in rows}
    for step in range(total):
        per_rank = ray.get([feeder.get_step.remote(step, rank) for rank in range(2)])
        served = [row for batches in per_rank for mb in batches for row in mb]
        assert len(served) == ray.get(feeder.num_pairs_in_step.remote(step))
        for row in served:
            assert {k: row[k] for k in by_id[row["pair_id"]]} == by_id[row["pair_id"]]
            assert row["ref_chosen_logp"] == pytest.approx(expected[row["pair_id"]][0], abs=1e-4)
            assert row["ref_rejected_logp"] == pytest.approx(expected[row["pair_id"]][1], abs=1e-4)
    evals = [row for rank in range(2) for mb in ray.get(feeder.get_eval.remote(rank)) for row in mb]
    assert sorted(r["pair_id"] for r in evals) == sorted(r["pair_id"] for r in eval_rows)
    assert all(r["ref_chosen_logp"] == pytest.approx(expected[r["pair_id"]][0], abs=1e-4) for r in evals)
    stats = ray.get(feeder.stats.remote())
    assert stats["ref_pairs_scored"] == 14 + 5  # epoch 2 reuses epoch 1's log-probs
    assert stats["steps_served"] == 4
    ids, chosen, _ = ray.get(feeder.scored_ref_logps.remote())
    assert sorted(ids) == sorted(expected) and chosen[0] == pytest.approx(expected[ids[0]][0], abs=1e-4)
    ray.kill(feeder)


def test_actor_scoring_error_surfaces_with_original_message(ray_cluster):
    import sys

    import ray
    import ray.cloudpickle

    from ray_dpo.feeder import start_feeder

    # Workers cannot import this test module: ship FakeReference by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    feeder = start_feeder(train=make_rows(8), plan=plan_of(num_epochs=1),
                          reference=FakeReference(fail_at=0))
    with pytest.raises(RuntimeError, match="reference exploded on batch 0"):
        ray.get(feeder.get_step.remote(0, 1), timeout=60)
    with pytest.raises(ValueError, match=r"^3 pair\(s\) have no reference log-probs") as info:
        start_feeder(train=make_rows(3), plan=plan_of())  # constructor errors raise here
    assert type(info.value) is ValueError
    ray.kill(feeder)
