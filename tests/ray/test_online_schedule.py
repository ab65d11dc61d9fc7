"""The online schedule's critical path, on stand-in roles that sleep instead of computing
(ray_dpo.testing.schedule) through the real coordinator, round and feeder code and the real
GenerationGroup (its engine a Ray actor).

One trainer-bound case: a round generates in 0.4 s and trains in 4 x 0.25 s. Asserted on the
order of the recorded intervals, not on how long anything took on this machine: with
online.overlap, round r+1 is generated while round r trains, from the weights synced at round
r's start, and from round 1 on the trainer never waits for a round. A serial schedule (each
round generated after the previous one trained) fails every one of these.

One reference-bound case (a step's reference batch 0.15 s, its update 0.1 s): round r+1 is
built while round r's batches are still being scored, and round r's all go first.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.ray]


def test_the_next_round_is_generated_while_this_one_trains_and_no_step_waits_for_it(ray_cluster, tiny_assets,
                                                                                    tmp_path):
    from ray_dpo.engines.facts import ENGINES
    from ray_dpo.testing.schedule import BACKEND, ScheduleCase, run_schedule
    from ray_dpo.testing.schedule_trace import generation

    case = ScheduleCase(gen_s=0.4, train_s=0.25, ref_s=0.02, steps_per_round=4, rounds=3)
    run = run_schedule(case, workdir=str(tmp_path / "run"), assets=tiny_assets)
    assert BACKEND not in ENGINES, "the stand-in engine is registered only during the run"

    events, S = run.events, case.steps_per_round
    gen = generation(events)
    assert sorted(gen) == [0, 1, 2], "one generation per round"
    trains = {e.index: e for e in events if e.role == "trainer" and e.what == "train"}
    fetches = {e.index: e for e in events if e.role == "trainer" and e.what == "fetch"}
    built = {e.index: e.end for e in events if e.role == "coordinator" and e.what == "built"}
    syncs = {e.index: e for e in events if e.role == "trainer" and e.what == "sync"}
    loads = sorted(e.start for e in events if e.role == "engine" and e.what == "load")
    assert sorted(trains) == list(range(3 * S)), "every step trained"

    for r in range(case.rounds - 1):
        first, last = trains[r * S], trains[r * S + S - 1]
        # Round r+1 is on the engine before round r's first step is done, and done before its
        # last: generated beside round r's training. Serially it would start after `last`.
        assert gen[r + 1][0] < first.end, f"round {r + 1}'s generation starts while round {r} trains"
        assert gen[r + 1][1] < last.end, f"round {r + 1} is generated before round {r} finishes training"
    for r in range(1, case.rounds - 1):
        # ... from the weights of round r's start: that sync's load comes first on the engine.
        sync = syncs[r * S]
        load = next(t for t in loads if t >= sync.start)
        assert gen[r][1] <= load <= gen[r + 1][0], f"round {r + 1} sampled from the step-{r * S} weights"
    for r in range(1, case.rounds):
        # The trainer never waited for a round: each was ready before its first step was asked.
        assert built[r] < fetches[r * S].start, f"step {r * S} did not wait for round {r}"
        assert built[r] < syncs[r * S].start, f"round {r} was ready before the sync that starts it"


def test_the_round_being_trained_gets_the_reference_before_the_next_round(ray_cluster, tiny_assets, tmp_path):
    """Round 1 is built ~0.1 s into round 0's 0.6 s of reference batches (and round 2 into
    round 1's): without a priority the rounds' prefetch threads take turns on the reference.
    With it, round r+1's feeder waits until round r's has sent its last batch."""
    from ray_dpo.testing.schedule import ScheduleCase, run_schedule

    case = ScheduleCase(gen_s=0.1, train_s=0.1, ref_s=0.15, steps_per_round=4, rounds=3)
    run = run_schedule(case, workdir=str(tmp_path / "run"), assets=tiny_assets)
    batches = [e.index for e in run.events if e.role == "reference" and e.what == "score"]  # by start
    assert batches == [0] * 4 + [1] * 4 + [2] * 4, "each round's batches before the next round's"
