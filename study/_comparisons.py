"""The comparisons a grid report makes, as data: every factor per network, dataset and stratum
(the other coordinates held equal), each arm of an ``lr-matched`` grid at its best learning
rate, and the family's Holm and Benjamini-Hochberg adjustments. Pure functions of the views.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tauopt.study._evidence import (
    SOON_SHARE,
    Difference,
    Factor,
    benjamini_hochberg,
    by_unit,
    difference,
    epochs_to,
    holm,
    pairs,
)
from tauopt.study._plots import panels, pick
from tauopt.study._views import TrialView

#: What each comparison varies; the difference reads "other - baseline".
FACTORS = (
    Factor("trainable vs fixed taus", "taus", "fixed", "trainable - fixed", other="trainable"),
    Factor(
        "trainable vs input-fixed taus",
        "taus",
        "input-fixed",
        "trainable - input-fixed",
        other="trainable",
    ),
    Factor(
        "input-fixed vs fixed taus", "taus", "fixed", "input-fixed - fixed", other="input-fixed"
    ),
    Factor("l1 penalty on vs off", "l1", 0.0, "l1 on - off"),
    Factor("horizon penalty on vs off", "horizon_weight", 0.0, "penalty on - off"),
    Factor("exact horizon (last tau) vs free", "last_tau", "free", "exact - free"),
    Factor("pruning on vs off", "pruning", "off", "pruning - none"),
    Factor("T = 6 vs T = 1", "T", 1.0, "T=6 - T=1"),
    Factor("detached vs full memory gradients", "memory", "full", "detached - full"),
)
#: Coordinates that never make a stratum: the seed pairs runs, the rest make the panel.
_NOT_STRATA = frozenset({"seed", "dataset", "arch", "protocol"})

_Measure = Callable[[TrialView, TrialView], tuple[float, float]]


def _gap(view: TrialView) -> float:
    train = view.record.train_accuracy
    return math.nan if train is None else train - view.record.test_accuracy


def _soon(base: TrialView, other: TrialView) -> tuple[float, float]:
    target = SOON_SHARE * min(base.record.test_accuracy, other.record.test_accuracy)
    return epochs_to(base.record.history.test_accuracy, target), epochs_to(
        other.record.history.test_accuracy, target
    )


def _prunes(view: TrialView) -> bool:
    return view.record.point.prunes


@dataclass(frozen=True)
class Measure:
    """What a table compares: ``value(base, other)``, shown times ``scale`` in ``unit``."""

    title: str
    unit: str
    scale: float
    fmt: str
    value: _Measure
    #: Only the pairs where the measure can differ (blocks removed: where either run prunes).
    relevant: Callable[[TrialView, TrialView], bool] = lambda b, o: True


MEASURES = (
    Measure(
        "Final test accuracy",
        "pts",
        100.0,
        "+.2f",
        lambda b, o: (b.record.test_accuracy, o.record.test_accuracy),
    ),
    Measure(
        f"Epochs to {SOON_SHARE:.0%} of the lower final test accuracy of the pair (the papers' "
        '"sooner": negative is sooner)',
        "epochs",
        1.0,
        "+.1f",
        _soon,
    ),
    Measure(
        "Training minus test accuracy (the generalisation gap)",
        "pts",
        100.0,
        "+.2f",
        lambda b, o: (_gap(b), _gap(o)),
    ),
    Measure(
        "Blocks removed by pruning",
        "blocks",
        1.0,
        "+.2f",
        lambda b, o: (float(b.record.blocks_removed), float(o.record.blocks_removed)),
        lambda b, o: _prunes(b) or _prunes(o),
    ),
)


@dataclass(frozen=True)
class Comparison:
    """One row of a report's table: what is compared (``cells``), the difference over seeds,
    and the family's adjusted p values (set by :func:`adjust`)."""

    table: str
    cells: tuple[str, ...]
    diff: Difference
    fmt: str
    holm_p: float | None = None
    bh_q: float | None = None

    @property
    def verdict(self) -> str:
        return self.diff.corrected(self.holm_p)


def _coords(view: TrialView) -> dict[str, Any]:
    return view.record.point.as_dict()


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


_Stratum = tuple[tuple[str, Any], ...]


def _stratum(base: TrialView, other: TrialView, key: str) -> _Stratum:
    """The coordinates a pair holds equal, and (a factor of three or more values) which
    value the other run has: ``exact - free`` with a projected and with a dependent last tau
    are two comparisons, not one."""
    items = _coords(base).items()
    held = tuple(sorted((k, v) for k, v in items if k not in _NOT_STRATA and k != key))
    return ((key, _coords(other)[key]), *held)


def paired(views: Sequence[TrialView], measure: Measure) -> list[Comparison]:
    """One comparison per factor, network, dataset and stratum (every other coordinate
    equal, and for a factor of three or more values the other run's value); the stratum is
    labelled by the coordinates it holds that vary in its panel."""
    rows = []
    for factor in FACTORS:
        for arch, dataset in panels(views):
            runs = pick(views, arch=arch, dataset=dataset)
            found = [(b, o) for b, o in pairs(runs, factor, _coords) if measure.relevant(b, o)]
            strata: dict[_Stratum, list[tuple[TrialView, TrialView]]] = {}
            for b, o in found:
                strata.setdefault(_stratum(b, o, factor.key), []).append((b, o))
            keys = list(strata)
            # label a stratum by what varies in the panel: it names every setting held equal
            # that could have been otherwise
            varying = {
                k
                for k in {k for v in runs for k in _coords(v)} - _NOT_STRATA
                if len({_show(_coords(v).get(k)) for v in runs}) > 1
            }
            if len({dict(k)[factor.key] for k in keys}) < 2:
                varying.discard(factor.key)
            # strata whose runs are the same runs (a setting that acted on none of them, as
            # pruning that never removed a block) give the same differences: one row
            merged: dict[tuple[Any, ...], list[_Stratum]] = {}
            for key in sorted(keys, key=str):
                merged.setdefault(_runs_of(strata[key]), []).append(key)
            for same in merged.values():
                diffs = []
                for b, o in strata[same[0]]:
                    base, other = measure.value(b, o)
                    diffs.append((b.record.point.seed, (other - base) * measure.scale))
                d = by_unit(diffs)
                cells = (factor.title, factor.contrast, arch, dataset, _label(same, varying))
                rows.append(Comparison(measure.title, (*cells, f"{len(diffs)} ({d.n})"), d, ""))
    return [replace(r, fmt=measure.fmt) for r in rows]


def _runs_of(found: list[tuple[TrialView, TrialView]]) -> tuple[Any, ...]:
    """What the pairs' runs trained to, epoch by epoch: equal for the same runs."""
    return tuple(
        sorted(
            (
                str(b.record.point.seed),
                tuple(b.record.history.test_accuracy),
                tuple(o.record.history.test_accuracy),
                b.record.test_accuracy,
                o.record.test_accuracy,
            )
            for b, o in found
        )
    )


def _label(strata: list[_Stratum], varying: set[str]) -> str:
    """The strata's coordinates that vary in the panel; where merged strata differ, their
    values joined by "/"."""
    names = [k for k, _ in strata[0] if k in varying]
    values = {k: list(dict.fromkeys(_show(dict(s)[k]) for s in strata)) for k in names}
    return ", ".join(f"{k}={'/'.join(values[k])}" for k in names) or "-"


#: The arms an ``lr-matched`` grid compares at their best rates: (other, baseline).
ARM_PAIRS = (("trainable", "fixed"), ("trainable", "input-fixed"), ("input-fixed", "fixed"))
BEST_TABLE = "Each arm at its best learning rate: final test accuracy"


def best_rates(views: Sequence[TrialView]) -> dict[tuple[Any, ...], TrialView]:
    """Per (network, dataset, T, seed, arm) with several learning rates: the run whose final
    validation accuracy is highest (the lower rate on a tie)."""
    groups: dict[tuple[Any, ...], list[TrialView]] = {}
    for v in views:
        p = v.record.point
        if p.lr is not None:
            key = (p.arch, p.dataset, p.T, p.seed, p.taus)
            groups.setdefault(key, []).append(v)
    return {
        key: max(runs, key=lambda v: (v.record.final_val_accuracy, -(v.record.point.lr or 0.0)))
        for key, runs in groups.items()
        if len({v.record.point.lr for v in runs}) > 1
    }


def best_rate_comparisons(views: Sequence[TrialView]) -> list[Comparison]:
    """The arms of :data:`ARM_PAIRS` at their best rates, paired by seed."""
    best = best_rates(views)
    rows = []
    for arch, dataset, T in sorted({k[:3] for k in best}, key=str):
        for other, base in ARM_PAIRS:
            diffs = []
            for seed in sorted({k[3] for k in best if k[:3] == (arch, dataset, T)}):
                o, b = (
                    best.get((arch, dataset, T, seed, other)),
                    best.get((arch, dataset, T, seed, base)),
                )
                if o is not None and b is not None:
                    diffs.append(100.0 * (o.record.test_accuracy - b.record.test_accuracy))
            if diffs:
                d = difference(diffs)
                cells = (f"{other} - {base}", arch, dataset, _show(T), str(d.n))
                rows.append(Comparison(BEST_TABLE, cells, d, "+.2f"))
    return rows


def adjust(rows: Sequence[Comparison]) -> list[Comparison]:
    """``rows`` with the Holm p values and Benjamini-Hochberg q values of the family of every
    tested row (two or more seeds that do not all agree)."""
    tested = [i for i, r in enumerate(rows) if r.diff.p_value is not None]
    p = [float(rows[i].diff.p_value or 0.0) for i in tested]
    holm_p, bh_q = holm(p), benjamini_hochberg(p)
    out = list(rows)
    for j, i in enumerate(tested):
        out[i] = replace(rows[i], holm_p=holm_p[j], bh_q=bh_q[j])
    return out


def mean_and_interval(values: Sequence[float]) -> Difference:
    """The mean of ``values`` (one per seed) with its 95 % t interval."""
    return difference([v for v in values if not math.isnan(v)])


def mean(values: Sequence[float]) -> float:
    data = [v for v in values if not math.isnan(v)]
    return statistics.fmean(data) if data else math.nan
