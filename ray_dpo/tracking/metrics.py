"""Pure helpers for metrics: which reported values are logged, and the progress line.

Workers report one dict per optimizer step through Ray Train; these helpers decide what of
it reaches MLflow and the console. No ray, no mlflow.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Mapping

LOGGED_PREFIXES = ("train/", "eval/", "perf/", "data/", "sync/", "online/")


def loggable(metrics: Mapping[str, object]) -> dict[str, float]:
    """The finite scalar metrics under the logged prefixes (drops ids, lists, NaN)."""
    out = {}
    for key, value in metrics.items():
        if not key.startswith(LOGGED_PREFIXES) or isinstance(value, bool):
            continue
        if isinstance(value, numbers.Real) and math.isfinite(float(value)):
            out[key] = float(value)
    return out


def format_duration(seconds: float) -> str:
    """1h02m, 3m05s or 42s."""
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


class StepClock:
    """Time per optimizer step, measured between reports, for the progress line's ETA.

    The first report of a session is the origin: one report gives no interval to measure,
    and the time before it is start-up (Ray, the worker group, model loading), not steps. A
    resumed run's first report, or a report that goes back to a checkpoint, is an origin too,
    so steps skipped or run again do not count.

    Eval pauses are counted apart: an interval whose report carries eval metrics (the
    steps ``eval_every`` divides, and the last) costs the steps' time plus one eval's. The
    ETA is (plain seconds per step) x (steps left) + (seconds per eval beyond its steps) x
    (evals left), so a run with held-out evals ahead is not promised the steps' time alone.
    Until a first eval was measured its cost is unknown and counted as 0. What else runs
    between reports (a checkpoint, an online round's wait) is amortized over the steps.

    Times are passed in (``now``), so the arithmetic is testable without sleeping.
    """

    def __init__(self, eval_every: int = 0) -> None:
        self.eval_every = eval_every
        self._last: tuple[float, int] | None = None
        self._plain = [0.0, 0]  # seconds, steps of intervals without an eval
        self._evals = [0.0, 0]  # seconds beyond their steps' time, evals

    def eta_s(self, *, step: int, total: int, now: float, evaluated: bool = False) -> float | None:
        """Seconds left after ``step`` of ``total``; None when not measurable yet.
        evaluated: this report carries eval metrics (the interval held an eval)."""
        if self._last is None or step <= self._last[1]:
            self._last = (now, step)
            return None if not self._plain[1] else self._eta(step, total)
        seconds, steps = max(now - self._last[0], 0.0), step - self._last[1]
        self._last = (now, step)
        if not evaluated:
            self._plain[0] += seconds
            self._plain[1] += steps
        elif self._plain[1]:
            self._evals[0] += max(seconds - steps * self._plain[0] / self._plain[1], 0.0)
            self._evals[1] += 1
        else:  # no plain interval yet to separate the eval from its steps: all steps
            self._plain[0] += seconds
            self._plain[1] += steps
        return self._eta(step, total)

    def _eta(self, step: int, total: int) -> float:
        left = max(total - step, 0)
        per_eval = self._evals[0] / self._evals[1] if self._evals[1] else 0.0
        return self._plain[0] / self._plain[1] * left + per_eval * self.evals_after(step, total)

    def evals_after(self, step: int, total: int) -> int:
        """Evals in steps step+1..total: every eval_every-th step, and the last."""
        if step >= total:
            return 0
        every = total // self.eval_every - step // self.eval_every if self.eval_every else 0
        return every + (0 if self.eval_every and total % self.eval_every == 0 else 1)


def progress_line(*, step: int, total: int, metrics: Mapping[str, float], eta_s: float | None) -> str:
    """``step 12/40 (30%) | loss 0.6712 | acc 0.62 | 1,234 tok/s | ETA 1m05s``.

    ``eta_s`` comes from :class:`StepClock`; None shows ``ETA ?`` (nothing measured yet).
    The last step shows no ETA.
    """
    parts = [f"step {step}/{total} ({100 * step / max(total, 1):.0f}%)"]
    if "train/loss" in metrics:
        parts.append(f"loss {metrics['train/loss']:.4f}")
    if "train/rewards/accuracies" in metrics:
        parts.append(f"acc {metrics['train/rewards/accuracies']:.2f}")
    if "eval/rewards/accuracies" in metrics:
        parts.append(f"eval acc {metrics['eval/rewards/accuracies']:.2f}")
    if "perf/tokens_per_s" in metrics:
        parts.append(f"{metrics['perf/tokens_per_s']:,.0f} tok/s")
    if step < total:
        parts.append("ETA ?" if eta_s is None else f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


class CountProgress:
    """Progress lines for counted work outside the train loop (pairs scored by the
    reference precompute, samples generated): ``<label>: 256/508 pairs (50%) | 12.3
    pairs/s | ETA 20s``.

    ``update(done)`` prints at most one line every ``every_s`` seconds, and always the
    line that reaches ``total``. The rate and the ETA come from the time since the object
    was made, so start-up inside the work (a first slow batch) is amortized. ``now`` and
    ``emit`` are injectable so the arithmetic is testable without sleeping.
    """

    def __init__(self, label: str, total: int, *, unit: str = "items", every_s: float = 15.0,
                 now=None, emit=None) -> None:
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self._now = now or time.monotonic
        self._emit = emit or (lambda line: print(line, flush=True))
        self._start = self._now()
        self._last_emit = self._start

    def line(self, done: int, now: float) -> str:
        elapsed = max(now - self._start, 1e-9)
        parts = [f"{self.label}: {done}/{self.total} {self.unit} ({100 * done / max(self.total, 1):.0f}%)",
                 f"{done / elapsed:,.1f} {self.unit}/s"]
        if done < self.total:
            parts.append(f"ETA {format_duration(elapsed / done * (self.total - done))}" if done else "ETA ?")
        else:
            parts.append(f"took {format_duration(elapsed)}")
        return " | ".join(parts)

    def update(self, done: int) -> None:
        now = self._now()
        if done >= self.total or now - self._last_emit >= self.every_s:
            self._last_emit = now
            self._emit(self.line(done, now))
