"""Paired evidence: runs that differ in one factor only, their differences, and what a 95 %
interval of the mean difference allows one to say.

A pair is two runs of a grid whose coordinates agree in everything but the factor (the seed
included: same initial weights, batches and split). The pairs of one seed are not independent
of each other, so they are averaged per seed first, and the interval is Student's t interval
over the seeds; with one seed there is none.

A report makes many comparisons at once. Each comparison's two-sided t test gives a p value;
:func:`holm` adjusts them for the family (the family-wise error rate: the chance that any
verdict of the family is wrong stays under 5 %), :func:`benjamini_hochberg` for the false
discovery rate (the expected share of wrong verdicts among those made). A difference whose
seeds all agree exactly (an interval of zero width) gets no p value and no verdict.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

#: Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom; then 40, 60, 120.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_T975_LARGE = ((40, 2.021), (60, 2.000), (120, 1.980))
_Z975 = 1.960


def t_quantile(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (a table: beyond 30,
    the next tabulated value at or below ``df``, so the interval errs wide)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    value = _T975[-1]
    for at, q in _T975_LARGE:
        if df >= at:
            value = q
    return value if df < 1000 else _Z975


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        even = m * (b - m) * x / ((qam + m2) * (a + m2))
        odd = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        for aa in (even, odd):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    log_front += a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """The two-sided p value of Student's t statistic ``t`` with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if math.isinf(t):
        return 0.0
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``p_values`` (family-wise error rate), in their order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def benjamini_hochberg(p_values: Sequence[float]) -> list[float]:
    """Benjamini and Hochberg's q values of ``p_values`` (false discovery rate), in their
    order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i], reverse=True)
    adjusted = [0.0] * m
    running = 1.0
    for rank, i in enumerate(order):
        running = min(running, p_values[i] * m / (m - rank))
        adjusted[i] = running
    return adjusted


#: The level of every interval and test.
ALPHA = 0.05


@dataclass(frozen=True)
class Difference:
    """The mean of ``n`` paired differences (one per seed), their standard deviation and the
    mean's 95 % t interval (None for one seed)."""

    n: int
    mean: float
    low: float | None
    high: float | None
    sd: float = math.nan

    @property
    def tested(self) -> bool:
        """Whether a test applies: two seeds or more that do not all agree."""
        return self.n >= 2 and self.sd > 0.0

    @property
    def all_equal(self) -> bool:
        """Every seed gave the same difference: an interval of zero width, no verdict."""
        return self.n >= 2 and self.sd == 0.0

    @property
    def p_value(self) -> float | None:
        """The two-sided t test's p value of "the mean difference is 0" (None untested)."""
        if not self.tested:
            return None
        return t_two_sided_p(self.mean / (self.sd / math.sqrt(self.n)), self.n - 1)

    @property
    def verdict(self) -> str:
        """The unadjusted verdict: "higher" or "lower" where the interval excludes 0."""
        if self.n == 0:
            return "no pairs"
        if self.low is None or self.high is None:
            return "one seed: no interval"
        if self.all_equal:
            return "all seeds equal"
        if self.low > 0:
            return "higher"
        if self.high < 0:
            return "lower"
        return "no difference detected"

    def corrected(self, holm_p: float | None) -> str:
        """The verdict with the family's Holm-adjusted p value: "higher (Holm)" where it
        survives the correction, "higher (unadjusted only)" where only the interval does."""
        plain = self.verdict
        if plain not in ("higher", "lower"):
            return plain
        survives = holm_p is not None and holm_p < ALPHA
        return f"{plain} ({'Holm' if survives else 'unadjusted only'})"

    def interval(self, fmt: str = "+.4f") -> str:
        if self.low is None or self.high is None:
            return "-"
        return f"[{self.low:{fmt}}, {self.high:{fmt}}]"


def by_unit(differences: Sequence[tuple[Any, float]]) -> Difference:
    """The mean of paired differences, with the 95 % t interval over independent units: the
    differences of one unit (a seed: its runs share initial weights and batches, and runs the
    factor leaves unchanged repeat each other) are averaged first, so that ``n`` counts units,
    not pairs. NaN differences are left out."""
    per_unit: dict[Any, list[float]] = {}
    for unit, value in differences:
        if not math.isnan(value):
            per_unit.setdefault(unit, []).append(value)
    return difference([statistics.fmean(v) for v in per_unit.values()])


def difference(values: Sequence[float]) -> Difference:
    """The mean of ``values`` (paired differences) with its 95 % t interval."""
    data = [v for v in values if not math.isnan(v)]
    n = len(data)
    if n == 0:
        return Difference(0, math.nan, None, None)
    mean = statistics.fmean(data)
    if n == 1:
        return Difference(1, mean, None, None)
    sd = statistics.stdev(data)
    if sd < 1e-12 * max(1.0, abs(mean)):  # equal but for float rounding
        sd = 0.0
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return Difference(n, mean, mean - half, mean + half, sd)


@dataclass(frozen=True)
class Factor:
    """One factor of a grid: the coordinate ``key``, its baseline value, and a title.
    ``base`` may be a predicate for a coordinate whose non-baseline values vary; ``other``,
    where set, is the one value compared with the baseline (a coordinate of three or more
    values compares them two at a time)."""

    title: str
    key: str
    base: Any
    contrast: str  # how the difference reads, "trainable - fixed"
    #: Coordinates whose values get rows of their own (the pairs are not pooled over them).
    by: tuple[str, ...] = ()
    other: Any = None

    def is_base(self, value: Any) -> bool:
        return bool(self.base(value)) if callable(self.base) else value == self.base

    def takes(self, value: Any) -> bool:
        """Whether a run with this value of ``key`` is on either side of the comparison."""
        return self.other is None or self.is_base(value) or value == self.other


def pairs(
    runs: Sequence[Any], factor: Factor, coords: Callable[[Any], dict[str, Any]]
) -> list[tuple[Any, Any]]:
    """Every (baseline run, other run) that agree on every coordinate but ``factor.key``."""
    by_rest: dict[str, tuple[list[Any], list[Any]]] = {}
    for run in runs:
        c = coords(run)
        if factor.key not in c or not factor.takes(c[factor.key]):
            continue
        rest = repr(sorted((k, v) for k, v in c.items() if k != factor.key))
        base, other = by_rest.setdefault(rest, ([], []))
        (base if factor.is_base(c[factor.key]) else other).append(run)
    return [(b, o) for base, others in by_rest.values() for b in base for o in others]


def epochs_to(history: Sequence[float], target: float) -> float:
    """The first epoch (1-based) whose value reaches ``target`` (NaN if none does)."""
    for epoch, value in enumerate(history, start=1):
        if value >= target:
            return float(epoch)
    return math.nan


#: A pair's "how soon": epochs until each run reaches this share of the lower of the two final
#: test accuracies (so both reach it).
SOON_SHARE = 0.98
