"""Pure helpers for metrics: which reported values are logged, and the progress line.

Workers report one dict per optimizer step through Ray Train; these helpers decide what of
it reaches MLflow and the console. No ray, no mlflow.
"""

from __future__ import annotations

import math
import numbers
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


def progress_line(*, step: int, total: int, metrics: Mapping[str, float], elapsed_s: float,
                  start_step: int = 0) -> str:
    """``step 12/40 (30%) | loss 0.6712 | acc 0.62 | 1,234 tok/s | ETA 1m05s``.

    ETA extrapolates the mean step time of this session (steps since ``start_step``, so a
    resumed run does not count the steps it skipped).
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
    done = step - start_step
    if done > 0 and total > step:
        parts.append(f"ETA {format_duration(elapsed_s / done * (total - step))}")
    return " | ".join(parts)
