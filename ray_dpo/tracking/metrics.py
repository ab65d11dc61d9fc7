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

    The first report of a session is the origin (its time and its step); the ETA at a later
    report is (time since the origin) / (steps since the origin) * (steps left). The first
    report has no ETA: one report gives no interval to measure, and the time before it is
    start-up (Ray, the worker group, model loading), not steps. Whatever runs between two
    reports -- an eval pass, a checkpoint, an online round's generation -- is part of that
    interval, so it is amortized over the steps. A resumed run's first report is its
    origin too, so the steps it skipped do not count.

    Times are passed in (``now``), so the arithmetic is testable without sleeping.
    """

    def __init__(self) -> None:
        self._origin: tuple[float, int] | None = None

    def eta_s(self, *, step: int, total: int, now: float) -> float | None:
        """Seconds left after ``step`` of ``total``; None when not measurable yet."""
        if self._origin is None:
            self._origin = (now, step)
            return None
        t0, s0 = self._origin
        done = step - s0
        if done <= 0:
            return None
        return max(now - t0, 0.0) / done * max(total - step, 0)


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
