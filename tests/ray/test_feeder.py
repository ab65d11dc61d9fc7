"""ray_dpo.feeder as the Ray actor of start_feeder, with a real ReferenceGroup and with a
failing fake one. The in-process tests (layout, determinism, resume, prefetch, errors) are
tests/unit/test_batch_feeder.py.
"""

from __future__ import annotations

import pytest

from ray_dpo.testing.feeder_fakes import FakeReference, make_rows, plan_of

pytestmark = pytest.mark.ray


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
    import ray

    from ray_dpo.feeder import start_feeder

    feeder = start_feeder(train=make_rows(8), plan=plan_of(num_epochs=1),
                          reference=FakeReference(fail_at=0))
    with pytest.raises(RuntimeError, match="reference exploded on batch 0"):
        ray.get(feeder.get_step.remote(0, 1), timeout=60)
    with pytest.raises(ValueError, match=r"^3 pair\(s\) have no reference log-probs") as info:
        start_feeder(train=make_rows(3), plan=plan_of())  # constructor errors raise here
    assert type(info.value) is ValueError
    ray.kill(feeder)
