"""A paired t-test in pure Python: is the difference of two runs more than the noise?

    paired_difference(a, b, level=0.95) -> Paired   mean of a[i] - b[i], its SE, t, p, CI
    t_two_sided_p(t, df) -> float                    P(|T| >= |t|), T ~ Student's t with df
    t_critical(df, level=0.95) -> float              |t| whose two-sided p is 1 - level
    incomplete_beta(a, b, x) -> float                regularized I_x(a, b) (continued fraction)

The held-out eval scores every prompt with every policy, so two runs' per-prompt means
pair up: the prompt-to-prompt spread (some prompts are just easier) cancels in a[i] - b[i],
and what is left is the noise of the samples and the difference of the policies. With n
prompts, the mean difference d, and s the standard deviation of the differences (n - 1 in
the denominator):

    SE = s / sqrt(n),  t = d / SE,  df = n - 1,  p = I_{df/(df+t^2)}(df/2, 1/2),
    CI = d -+ t_critical(df) * SE

No scipy: `ray-dpo compare` runs where only mlflow and matplotlib are installed, and the
t distribution needs nothing beyond math.lgamma. Pure: no ray, deepspeed or vllm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

_EPS = 1e-15
_TINY = 1e-300
_MAX_ITERATIONS = 500


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz; Numerical Recipes' betacf),
    which converges fast for x < (a + 1) / (a + b + 2)."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _MAX_ITERATIONS + 1):
        even = m * (b - m) * x / ((a + 2 * m - 1.0) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1.0))
        for coefficient in (even, odd):
            d = 1.0 + coefficient * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + coefficient / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if a <= 0 or b <= 0:
        raise ValueError(f"incomplete_beta needs a, b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"incomplete_beta needs 0 <= x <= 1, got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b  # I_x(a, b) = 1 - I_{1-x}(b, a)


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for T with Student's t distribution of ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")
    if math.isnan(t):
        raise ValueError("t is NaN")
    if math.isinf(t):
        return 0.0
    return incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def t_critical(df: float, level: float = 0.95) -> float:
    """The t with t_two_sided_p(t, df) = 1 - level (e.g. 2.228 for df 10 at 95%), by
    bisection: the p-value falls monotonically in |t|."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    alpha = 1.0 - level
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > alpha:
        low, high = high, high * 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        if t_two_sided_p(mid, df) > alpha:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * high:
            break
    return (low + high) / 2.0


@dataclass(frozen=True)
class Paired:
    """A paired comparison of a and b (a[i] and b[i] measured on the same unit i)."""

    n: int
    mean_a: float
    mean_b: float
    mean_diff: float
    """mean of a[i] - b[i] (= mean_a - mean_b)."""
    sd: float
    """standard deviation of the differences, n - 1 in the denominator."""
    se: float
    """sd / sqrt(n): the standard error of mean_diff."""
    t: float
    df: int
    p: float
    """two-sided, Student's t with df = n - 1."""
    ci_low: float
    ci_high: float
    level: float

    @property
    def significant(self) -> bool:
        """The level's confidence interval leaves out 0 (equivalently p < 1 - level)."""
        return self.p < 1.0 - self.level


def paired_difference(a: Sequence[float], b: Sequence[float], *, level: float = 0.95) -> Paired:
    """The paired t-test of a against b. Needs at least 2 pairs. Differences all equal give
    SE 0: t is 0 with p 1 when they are all 0 (the same samples scored the same), else
    infinite with p 0."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} values against {len(b)}: a paired comparison needs one of each per unit")
    n = len(a)
    if n < 2:
        raise ValueError(f"a paired comparison needs at least 2 pairs, got {n}")
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    if se > 0:
        t = mean / se
    else:
        t = 0.0 if mean == 0 else math.copysign(math.inf, mean)
    half = t_critical(n - 1, level) * se
    return Paired(n=n, mean_a=sum(map(float, a)) / n, mean_b=sum(map(float, b)) / n, mean_diff=mean, sd=sd, se=se,
                  t=t, df=n - 1, p=t_two_sided_p(t, n - 1), ci_low=mean - half, ci_high=mean + half, level=level)
