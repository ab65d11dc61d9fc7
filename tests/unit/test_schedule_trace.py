"""ray_dpo.testing.schedule_trace on hand-written traces: a round's wall time, its bound and
what the trainer waited on, for an overlapped and a serial schedule of the same work."""

from __future__ import annotations

import pytest

from ray_dpo.testing.schedule_trace import Event, rounds


def _trace(*, overlap: bool) -> list[Event]:
    """2 rounds of 2 steps (1 s each), 3 s of generation a round, no reference wait.

    Overlapped: round 1 is generated right after round 0 (both submitted at step 0), so
    the sync at step 2 waits until 6 s. Serial: round 1 is submitted at that sync, so it
    waits from 5 s to 8 s."""
    gen1 = (3.0, 6.0) if overlap else (5.0, 8.0)
    start1 = gen1[1]
    return [
        Event("trainer", "sync", 0, 0.0, 0.0),
        Event("engine", "generate", 0, 0.0, 3.0),
        Event("coordinator", "built", 0, 3.0, 3.0),
        Event("trainer", "fetch", 0, 0.0, 3.0),
        Event("trainer", "train", 0, 3.0, 4.0),
        Event("trainer", "fetch", 1, 4.0, 4.0),
        Event("trainer", "train", 1, 4.0, 5.0),
        Event("engine", "generate", 1, *gen1),
        Event("trainer", "sync", 2, 5.0, start1),
        Event("coordinator", "built", 1, start1, start1),
        Event("trainer", "fetch", 2, start1, start1 + 0.5),  # its reference log-probs: 0.5 s
        Event("trainer", "train", 2, start1 + 0.5, start1 + 1.5),
        Event("trainer", "fetch", 3, start1 + 1.5, start1 + 1.5),
        Event("trainer", "train", 3, start1 + 1.5, start1 + 2.5),
    ]


@pytest.mark.parametrize("overlap, wall, waits", [
    (True, 3.5, {"generation": 1.0, "reference": 0.5}),
    (False, 5.5, {"generation": 3.0, "reference": 0.5}),
])
def test_rounds_measure_wall_time_against_the_longer_role_and_say_what_was_waited_on(overlap, wall, waits):
    first, second = rounds(_trace(overlap=overlap), steps_per_round=2)
    assert (first.wall_s, first.gen_s, first.train_s, first.waits) == (5.0, 3.0, 2.0, {"generation": 3.0})
    assert second.wall_s == pytest.approx(wall) and second.bound_s == 3.0
    assert second.waits == pytest.approx(waits)
    assert second.ratio == pytest.approx(wall / 3.0)
    assert second.waited_on.startswith("generation") and "reference 0.50 s" in second.waited_on
