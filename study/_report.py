"""``tauopt report``: a study's figures as PNG files and a report.md that answers, from the
study's own trials, the questions the papers leave open.

A grid of ``tauopt reproduce`` is answered with paired evidence (see
:mod:`tauopt.study._evidence`): for every factor, per network and dataset, the mean
difference of runs that differ in that factor only, its 95 % interval and a verdict. A
search study has no such pairs: its report describes the front and says so.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import optuna

from tauopt.storage import access, storage_of
from tauopt.study._evidence import SOON_SHARE, Factor, by_unit, epochs_to, pairs
from tauopt.study._figures import publish
from tauopt.study._plots import (
    REGULARISERS,
    grid_figures,
    panels,
    pick,
    regulariser,
    search_figures,
)
from tauopt.study._record import ANCHORS_ATTR
from tauopt.study._reproduce import DEFAULT_EPOCHS, REPRODUCE_ATTR
from tauopt.study._views import TrialView, trial_views

#: What each comparison varies; the difference reads "other - baseline".
FACTORS = (
    Factor(
        "trainable vs fixed taus",
        "taus",
        "fixed",
        "trainable - fixed",
        by=("T",),
        other="trainable",
    ),
    Factor(
        "trainable vs input-fixed taus",
        "taus",
        "input-fixed",
        "trainable - input-fixed",
        by=("T",),
        other="trainable",
    ),
    Factor(
        "input-fixed vs fixed taus",
        "taus",
        "fixed",
        "input-fixed - fixed",
        by=("T",),
        other="input-fixed",
    ),
    Factor("l1 penalty on vs off", "l1", 0.0, "l1 on - off"),
    Factor("horizon penalty on vs off", "horizon_weight", 0.0, "penalty on - off"),
    Factor("exact horizon (last tau) vs free", "last_tau", "free", "exact - free"),
    Factor("pruning on vs off", "pruning", "off", "pruning - none"),
    Factor("T = 6 vs T = 1", "T", 1.0, "T=6 - T=1"),
    Factor("detached vs full memory gradients", "memory", "full", "detached - full"),
)
_Measure = Callable[[TrialView, TrialView], tuple[float, float]]


def _final(view: TrialView) -> float:
    return view.test_accuracy


def _gap(view: TrialView) -> float:
    train = view.record.train_accuracy
    return math.nan if train is None else train - view.test_accuracy


def _soon(base: TrialView, other: TrialView) -> tuple[float, float]:
    target = SOON_SHARE * min(base.test_accuracy, other.test_accuracy)
    return epochs_to(base.test_history, target), epochs_to(other.test_history, target)


MEASURES: tuple[tuple[str, str, _Measure], ...] = (
    ("Final test accuracy", "+.4f", lambda b, o: (_final(b), _final(o))),
    (
        f"Epochs to {SOON_SHARE:.0%} of the lower final test accuracy of the pair (the "
        'papers\' "sooner": negative is sooner)',
        "+.1f",
        _soon,
    ),
    (
        "Training minus test accuracy (the generalisation gap)",
        "+.4f",
        lambda b, o: (_gap(b), _gap(o)),
    ),
    ("Blocks removed by pruning", "+.2f", lambda b, o: (b.blocks_removed, o.blocks_removed)),
)


def _prunes(view: TrialView) -> bool:
    return bool((view.grid or {}).get("pruning", "off") != "off")


#: A measure's rows keep only the pairs where it can differ: blocks removed where either run
#: prunes (elsewhere both are 0 by construction).
_RELEVANT: dict[str, Callable[[TrialView, TrialView], bool]] = {
    "Blocks removed by pruning": lambda b, o: _prunes(b) or _prunes(o),
}


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _coords(view: TrialView) -> dict[str, object]:
    return dict(view.grid or {})


def paired_rows(
    views: Sequence[TrialView],
    measure: _Measure,
    fmt: str,
    relevant: Callable[[TrialView, TrialView], bool] = lambda b, o: True,
) -> list[str]:
    """One row per factor, network and dataset that has (relevant) pairs."""
    rows = []
    for factor in FACTORS:
        for arch, dataset in panels(views):
            for where, runs in _split(pick(views, arch=arch, dataset=dataset), factor.by):
                rows += _paired_row(factor, f"{arch}{where}", dataset, runs, measure, fmt, relevant)
    return rows


def _split(runs: list[TrialView], by: tuple[str, ...]) -> list[tuple[str, list[TrialView]]]:
    """``runs`` as one group, or one per value of the coordinates ``by`` (labelled)."""
    if not by:
        return [("", runs)]
    groups: dict[tuple[Any, ...], list[TrialView]] = {}
    for run in runs:
        groups.setdefault(tuple(_coords(run).get(k) for k in by), []).append(run)
    return [(_label(by, values), groups[values]) for values in sorted(groups, key=str)]


def _label(keys: tuple[str, ...], values: tuple[Any, ...]) -> str:
    pairs_ = zip(keys, values, strict=True)
    named = (f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in pairs_)
    return " (" + ", ".join(named) + ")"


def _paired_row(
    factor: Factor,
    network: str,
    dataset: str,
    runs: list[TrialView],
    measure: _Measure,
    fmt: str,
    relevant: Callable[[TrialView, TrialView], bool],
) -> list[str]:
    found = [(b, o) for b, o in pairs(runs, factor, _coords) if relevant(b, o)]
    if not found:
        return []
    diffs = []
    for base, other in found:
        b, o = measure(base, other)
        diffs.append((_coords(base).get("seed"), o - b))
    d = by_unit(diffs)
    mean = "-" if d.n == 0 else f"{d.mean:{fmt}}"
    count = f"{len(found)} ({d.n})"
    return [
        _row(
            factor.title, factor.contrast, network, dataset, count, mean, d.interval(fmt), d.verdict
        )
    ]


def _paired_section(views: Sequence[TrialView]) -> list[str]:
    lines = [
        "## Paired differences",
        "",
        "Each row compares runs that differ in one factor only: same network, dataset and seed "
        "(so the same initial weights and batches), every other setting equal. The difference "
        "is the second run's value minus the first's (the \"difference\" column says which). "
        "The pairs of one seed are averaged first (they share the seed's weights and batches, "
        "and a setting the factor leaves inert repeats a pair), then over the seeds: the "
        '"pairs (seeds)" column gives both counts, and the interval is the 95 % Student t '
        "interval over the seeds (none with one seed; of zero width where every seed differed "
        'by the same amount). The verdict says "higher" or "lower" only where the interval '
        'excludes 0; otherwise "no difference detected", which is not evidence of no effect '
        "when the interval is wide.",
        "",
    ]
    header = [
        "factor",
        "difference",
        "network",
        "dataset",
        "pairs (seeds)",
        "mean",
        "95 % interval (t)",
        "verdict",
    ]
    for title, fmt, measure in MEASURES:
        relevant = _RELEVANT.get(title, lambda b, o: True)
        rows = paired_rows(views, measure, fmt, relevant)
        lines += [f"### {title}", ""]
        if not rows:
            lines += [_NO_PAIRS.get(title, _NO_PAIRS[""]), ""]
            continue
        lines += [_row(*header), "|---" * len(header) + "|", *rows, ""]
        if _all_zero(views, measure, relevant):
            lines += [_ALL_ZERO[title](_epochs(views)), ""]
    return lines


#: Why a measure's table has no row.
_NO_PAIRS = {
    "": "No pair of runs here differs in one factor only: the study has none of the grid's "
    "pairs (run `tauopt reproduce` without `--only`).",
    "Blocks removed by pruning": "No row: no pair of runs here has pruning on in either run, "
    "and elsewhere both runs keep every block by construction (the grid's pruning cells "
    "come with `tauopt reproduce` without `--only fixed-vs-trainable`).",
}


def _one_epoch(epochs: int) -> str:
    return (
        " With one epoch a run, the first epoch is the last: train more epochs (`tauopt "
        "reproduce --epochs`) for this measure to say anything."
        if epochs == 1
        else ""
    )


#: Why every difference in a measure's table is 0, given the epochs a run trained.
_ALL_ZERO: dict[str, Callable[[int], str]] = {
    MEASURES[0][0]: lambda e: (
        "Every difference is 0: paired runs ended at the same test accuracy." + _one_epoch(e)
    ),
    MEASURES[1][0]: lambda e: (
        "Every difference is 0: in every pair both runs reached "
        f"{SOON_SHARE:.0%} of the lower final accuracy in the same epoch." + _one_epoch(e)
    ),
    MEASURES[2][0]: lambda e: (
        "Every difference is 0: paired runs ended with the same gap." + _one_epoch(e)
    ),
    MEASURES[3][0]: lambda e: (
        "Every difference is 0: no run removed a different number of "
        f"blocks than its pair (in {e} epoch{'s' if e != 1 else ''}, no tau fell below its "
        "threshold, or both fell alike)."
    ),
}


def _all_zero(
    views: Sequence[TrialView], measure: _Measure, relevant: Callable[[TrialView, TrialView], bool]
) -> bool:
    """Whether every pair's difference in ``measure`` is exactly 0 (NaN pairs aside)."""
    diffs = []
    for factor in FACTORS:
        for arch, dataset in panels(views):
            for _, runs in _split(pick(views, arch=arch, dataset=dataset), factor.by):
                for base, other in pairs(runs, factor, _coords):
                    if relevant(base, other):
                        b, o = measure(base, other)
                        diffs.append(o - b)
    found = [d for d in diffs if not math.isnan(d)]
    return bool(found) and all(d == 0 for d in found)


def _epochs(views: Sequence[TrialView]) -> int:
    """The epochs the runs trained (the most, where they differ)."""
    return max((len(v.test_history) for v in views), default=0)


def _budget(study: optuna.Study, views: Sequence[TrialView]) -> list[str]:
    spec = study.user_attrs[REPRODUCE_ATTR]["spec"]
    protocol = spec.get("protocol", "tauopt")
    epochs, size = spec.get("epochs"), spec.get("train_size")
    seeds = sorted({int((v.grid or {}).get("seed", 0)) for v in views})
    lines = [
        f"Protocol `{protocol}`: {len(views)} finished runs of {spec.get('runs', '?')}, "
        f"{epochs} epochs on {size or 'all'} training images each, seeds {seeds}.",
        "",
        *_compute(study, views),
    ]
    short = protocol == "authors" and (epochs < DEFAULT_EPOCHS["authors"] or size is not None)
    if short or protocol != "authors":
        lines += [
            f"**Scaled down:** the papers train 200 epochs on all 60,000 images; these runs "
            f"trained {epochs} epochs on {size or 'all'} images. What holds here may not hold at "
            "convergence, and the verdicts are about this budget only.",
            "",
        ]
    if len(seeds) < 2:
        lines += [
            "**One seed:** there are mean differences but no intervals and no verdicts: "
            "the runs of one seed cannot tell a factor's effect from the seed's. Run "
            "`tauopt reproduce --seeds 3` (or more) for evidence.",
            "",
        ]
    return lines


def _compute(study: optuna.Study, views: Sequence[TrialView]) -> list[str]:
    """Compute per run (its epochs' seconds: a population's shared out) and the wall time
    from the first run's start to the last run's end."""
    per_run = sorted(sum(v.epoch_seconds) for v in views)
    done = [t for t in study.get_trials(deepcopy=False) if t.datetime_complete]
    if not per_run or not done:
        return []
    start = min(t.datetime_start for t in done if t.datetime_start)
    wall = (max(t.datetime_complete for t in done if t.datetime_complete) - start).total_seconds()
    devices = sorted({v.record.machine or v.record.device for v in views})
    return [
        f"Compute per run (the seconds of its epochs; runs trained together as a population "
        f"share an epoch's time): median {statistics.median(per_run):.1f} s, range "
        f"{per_run[0]:.1f}-{per_run[-1]:.1f} s, {sum(per_run) / 3600:.2f} h in all, on "
        f"{'; '.join(devices)}; wall time from the first start to the last end "
        f"{wall / 3600:.2f} h ({start:%Y-%m-%d}).",
        "",
    ]


def _mean(values: Iterable[float]) -> str:
    data = [v for v in values if not math.isnan(v)]
    return f"{statistics.fmean(data):.4f}" if data else "-"


def _clean_loss_section(views: Sequence[TrialView]) -> list[str]:
    lines = [
        "## How the loss decays",
        "",
        "Clean loss (training cross-entropy without the penalties, mean over an epoch's batches) "
        "of the trainable runs without pruning, mean over runs: after the first epoch, at the "
        "middle and at the end ([clean_loss.png](clean_loss.png)).",
        "",
        _row("network", "regulariser", "runs", "epoch 1", "middle", "last"),
        "|---|---|---|---|---|---|",
    ]
    for arch in sorted({a for a, _ in panels(views)}, key=lambda a: a != "resnet"):
        trainable = pick(views, arch=arch, taus="trainable", pruning="off")
        for name in dict.fromkeys(REGULARISERS.values()):
            runs = [v.record.clean_loss_history for v in trainable if regulariser(v) == name]
            runs = [r for r in runs if r]
            if runs:
                mid = min(len(r) for r in runs) // 2
                lines.append(
                    _row(
                        arch,
                        name,
                        len(runs),
                        _mean(r[0] for r in runs),
                        _mean(r[mid] for r in runs),
                        _mean(r[-1] for r in runs),
                    )
                )
    return [*lines, ""]


def _regulariser_section(views: Sequence[TrialView]) -> list[str]:
    """The regularisers side by side (descriptive: the paired rows above give the evidence)."""
    lines = [
        "## The regularisers side by side",
        "",
        "Trainable runs, every T and dataset pooled, means over runs: final test accuracy, how "
        "far the taus end from the horizon (`|sum(tau) - T|`), how much of `sum|tau|` the "
        "largest tau holds, and the blocks pruning removed (runs with pruning on).",
        "",
        _row(
            "network",
            "regulariser",
            "runs",
            "test accuracy",
            "abs(sum(tau) - T)",
            "largest tau's share",
            "blocks removed",
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for arch in sorted({a for a, _ in panels(views)}, key=lambda a: a != "resnet"):
        trainable = pick(views, arch=arch, taus="trainable")
        for name in dict.fromkeys(REGULARISERS.values()):
            runs = [v for v in trainable if regulariser(v) == name and v.record.taus]
            if not runs:
                continue
            pruning = [float(v.blocks_removed) for v in runs if _prunes(v)]
            lines.append(
                _row(
                    arch,
                    name,
                    len(runs),
                    _mean(v.test_accuracy for v in runs),
                    _mean(abs(v.record.tau_sum - float(v.config.get("T", 1.0))) for v in runs),
                    _mean(
                        max(map(abs, v.record.taus)) / sum(map(abs, v.record.taus)) for v in runs
                    ),
                    _mean(pruning) if pruning else "-",
                )
            )
    return [*lines, ""]


def _tau_section(views: Sequence[TrialView]) -> list[str]:
    lines = [
        "## Negative step sizes",
        "",
        "The ResNet's taus are not projected (neither in the papers' code): gradient steps and "
        "the l1 penalty's sign term can carry a tau below 0, where its block subtracts. The "
        "Fractional DNN holds every tau at tau_min or above.",
        "",
        _row("network", "trainable runs", "a tau below 0 at some epoch", "below 0 at the end"),
        "|---|---|---|---|",
    ]
    for arch in sorted({a for a, _ in panels(views)}, key=lambda a: a != "resnet"):
        runs = pick(views, arch=arch, taus="trainable")
        ever = sum(any(t < 0 for row in v.tau_history for t in row) for v in runs)
        end = sum(any(t < 0 for t in v.record.taus) for v in runs)
        lines.append(_row(arch, len(runs), ever, end))
    return [*lines, ""]


def _grid_report(study: optuna.Study, views: Sequence[TrialView], out: Path) -> list[str]:
    figures = grid_figures(views, out)
    lines = [f"# Study {study.study_name!r}: reproduction of the papers' experiments", ""]
    lines += _budget(study, views)
    lines += [f"![{f.stem}]({f.name})" for f in figures] + [""]
    lines += _paired_section(views) + _clean_loss_section(views)
    lines += _regulariser_section(views) + _tau_section(views)
    return lines


def _search_report(study: optuna.Study, views: Sequence[TrialView], out: Path) -> list[str]:
    figures = search_figures(study, views, out)
    lines = [f"# Study {study.study_name!r}: hyperparameter search", ""]
    lines += [f"![{f.stem}]({f.name})" for f in figures] + [""]
    feasible = [v for v in views if v.feasible]
    front = [v for v in feasible if v.pareto]
    lines += [
        "## The front",
        "",
        f"{len(views)} complete trials, {len(feasible)} feasible, {len(front)} on the front; "
        f"{sum(bool(v.pruned) for v in front)} of those pruned blocks.",
        "",
        "A search draws its trials at random and steers them: no two of them differ in one "
        "setting only, so it cannot say what a setting does. For paired answers, run the grid "
        f"(`tauopt reproduce`). {_anchored(study)}What the trials show, as descriptions:",
        "",
        _row(
            "trials",
            "n",
            "mean validation accuracy",
            "mean train - test accuracy",
            "mean blocks removed",
        ),
        "|---|---|---|---|---|",
    ]
    groups = {
        "no block removed": [v for v in feasible if not v.pruned],
        "blocks removed": [v for v in feasible if v.pruned],
        "l1 off": [v for v in feasible if not v.config.get("l1")],
        "l1 on": [v for v in feasible if v.config.get("l1")],
    }
    for name, chosen in groups.items():
        lines.append(
            _row(
                name,
                len(chosen),
                _mean(v.val_accuracy for v in chosen),
                _mean(
                    v.record.train_accuracy - v.test_accuracy
                    for v in chosen
                    if v.record.train_accuracy is not None
                ),
                _mean(float(v.blocks_removed) for v in chosen),
            )
        )
    return [*lines, ""]


def _anchored(study: optuna.Study) -> str:
    """Which trials were placed, not drawn: a Pareto study's anchors (``study.anchors``)."""
    n = len((study.user_attrs.get(ANCHORS_ATTR) or {}).get("params", []))
    if not n:
        return ""
    return (
        f"Its first {n} trials were anchors, placed at the pruning end (the highest "
        "layer_prune_eps, large learning rates: `study.anchors`), not drawn. "
    )


def write_report(study: optuna.Study, out: Path) -> list[Path]:
    """Write the PNG figures and ``report.md`` into ``out``; put the study figures on the
    dashboard too. Returns the files written."""
    views = trial_views(study)
    if not views:
        raise ValueError(f"study {study.study_name!r} has no complete trial to report on")
    out.mkdir(parents=True, exist_ok=True)
    grid = REPRODUCE_ATTR in study.user_attrs
    lines = _grid_report(study, views, out) if grid else _search_report(study, views, out)
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    publish(study, access(storage_of(study)))
    return [*sorted(out.glob("*.png")), report]
