"""The progress line and its ETA (ray_dpo.tracking.metrics): times are injected, no sleeps."""

import pytest

from ray_dpo.tracking.metrics import CountProgress, StepClock, format_duration, progress_line


def etas(reports, total):
    """ETA at each (step, time) report of one session."""
    clock = StepClock()
    return [clock.eta_s(step=step, total=total, now=now) for step, now in reports]


def test_first_report_has_no_eta_then_steps_left_times_time_per_step():
    # Start-up took 100 s before step 1; then 10 s per step.
    reports = [(1, 100.0), (2, 110.0), (3, 120.0), (4, 130.0)]
    assert etas(reports, total=10) == [None, 80.0, 70.0, 60.0]


def test_eta_is_right_from_step_2_even_after_a_slow_start():
    # The bug this replaces: the clock started at the first report but counted step 1 as
    # done, so at step k it was low by (k-1)/k -- 21 s shown with 11 min left.
    # 60 s per step, 12 steps left at step 2 -> 12 min.
    reports = [(1, 500.0), (2, 560.0)]
    assert etas(reports, total=14)[1] == pytest.approx(12 * 60)


def test_eval_and_checkpoint_time_between_reports_is_amortized():
    # 10 s steps, but the report after step 4 came 40 s late (an eval pass + a checkpoint).
    reports = [(1, 0.0), (2, 10.0), (3, 20.0), (4, 30.0), (5, 80.0)]
    # (80 - 0) s over 4 steps = 20 s per step, 5 steps left.
    assert etas(reports, total=10)[-1] == pytest.approx(100.0)


def test_resumed_run_measures_from_its_own_first_report():
    # Resumed after a checkpoint at step 40: the first report is step 41.
    reports = [(41, 1000.0), (42, 1004.0), (43, 1008.0)]
    assert etas(reports, total=50) == [None, pytest.approx(32.0), pytest.approx(28.0)]


def test_last_step_has_nothing_left():
    assert etas([(1, 0.0), (2, 5.0)], total=2) == [None, 0.0]


def test_a_repeated_step_does_not_divide_by_zero():
    assert etas([(3, 0.0), (3, 1.0)], total=10) == [None, None]


def test_progress_line_shows_eta_unknown_at_first_report_and_none_at_the_end():
    metrics = {"train/loss": 0.69314, "train/rewards/accuracies": 0.5, "perf/tokens_per_s": 1234.4}
    first = progress_line(step=1, total=40, metrics=metrics, eta_s=None)
    assert first == "step 1/40 (2%) | loss 0.6931 | acc 0.50 | 1,234 tok/s | ETA ?"
    assert progress_line(step=12, total=40, metrics=metrics, eta_s=65.0).endswith("| ETA 1m05s")
    last = progress_line(step=40, total=40, metrics=metrics, eta_s=0.0)
    assert "ETA" not in last and last.startswith("step 40/40 (100%)")


def test_format_duration():
    assert [format_duration(s) for s in (0, 42.4, 185, 3720)] == ["0s", "42s", "3m05s", "1h02m"]


def counted(updates, total, every_s=10.0):
    """Lines a CountProgress prints for (done, time) updates, the clock starting at 0."""
    times = iter([0.0] + [t for _, t in updates])
    lines = []
    progress = CountProgress("reference log-probs", total, unit="pairs", every_s=every_s,
                             now=lambda: next(times), emit=lines.append)
    for done, _ in updates:
        progress.update(done)
    return lines


def test_count_progress_rate_and_eta_from_the_start_and_throttled():
    # 32 pairs every 4 s; a line at most every 10 s, and always the last one.
    updates = [(32 * i, 4.0 * i) for i in range(1, 5)] + [(150, 19.0)]
    lines = counted(updates, total=150)
    assert lines == [
        # at 12 s: 96 pairs, 8 pairs/s, 54 pairs left -> 6.75 s
        "reference log-probs: 96/150 pairs (64%) | 8.0 pairs/s | ETA 7s",
        "reference log-probs: 150/150 pairs (100%) | 7.9 pairs/s | took 19s",
    ]


def test_count_progress_without_anything_done_has_no_eta():
    assert counted([(0, 30.0)], total=10) == ["reference log-probs: 0/10 pairs (0%) | 0.0 pairs/s | ETA ?"]


def test_eval_pauses_ahead_are_counted_once_one_was_measured():
    # 10 s steps; the eval at step 4 took 30 s more. eval_every 4, 12 steps: evals at 8 and
    # 12 are still ahead at step 5, so 7 steps x 10 s + 2 evals x 30 s.
    clock = StepClock(eval_every=4)
    reports = [(1, 0.0, False), (2, 10.0, False), (3, 20.0, False), (4, 60.0, True), (5, 70.0, False)]
    got = [clock.eta_s(step=s, total=12, now=t, evaluated=e) for s, t, e in reports]
    assert got[-1] == pytest.approx(7 * 10 + 2 * 30)
    assert got[2] == pytest.approx(9 * 10)  # before any eval: its cost is not known yet
    assert clock.evals_after(8, 12) == 1 and clock.evals_after(12, 12) == 0
    assert StepClock(eval_every=4).evals_after(5, 10) == 2  # step 8, and the last (10)
    assert StepClock().evals_after(3, 10) == 1  # only the last step's eval


def test_a_rollback_keeps_the_measured_rates():
    clock = StepClock()
    for step, now in ((1, 0.0), (2, 10.0), (3, 20.0)):
        clock.eta_s(step=step, total=10, now=now)
    # The group restarted from the checkpoint at step 1: step 2 again, 60 s later.
    assert clock.eta_s(step=2, total=10, now=80.0) == pytest.approx(80.0)
    assert clock.eta_s(step=3, total=10, now=90.0) == pytest.approx(70.0)
