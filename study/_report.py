"""``tauopt report``: a study's figures as PNG files and a report.md that answers, from the
study's own trials, the questions the papers leave open.

A grid of ``tauopt reproduce`` is answered with paired evidence (see
:mod:`tauopt.study._comparisons` and :mod:`tauopt.study._grid_report`), from one study, several
studies (a long grid run in parts) or exported trials. A search study has no such pairs: its
report describes the front and says so.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

import optuna

from tauopt.errors import ConfigError, DataError
from tauopt.storage import access, storage_of
from tauopt.study._exported import point_key, read_export
from tauopt.study._figures import publish
from tauopt.study._grid_report import (
    GridRuns,
    budget,
    clean_loss_section,
    comparisons,
    ends_section,
    failed_section,
    lr_section,
    paired_section,
    reading,
    regulariser_section,
    tau_section,
)
from tauopt.study._plots import grid_figures, min_val_accuracy, search_figures
from tauopt.study._record import ANCHORS_ATTR, FAIL_REASON_ATTR, GRID_POINT_ATTR
from tauopt.study._reproduce import REPRODUCE_ATTR
from tauopt.study._views import TrialView, trial_views


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _mean(values: Iterable[float]) -> str:
    data = [v for v in values if not math.isnan(v)]
    return f"{statistics.fmean(data):.4f}" if data else "-"


def grid_runs(studies: Sequence[optuna.Study]) -> GridRuns:
    """The finished runs of ``studies``, each a grid of ``tauopt reproduce``, as one grid."""
    views: list[TrialView] = []
    spans = []
    failed = []
    points: set[str] = set()
    where: dict[str, int] = {}
    for i, study in enumerate(studies):
        if REPRODUCE_ATTR not in study.user_attrs:
            raise ConfigError(
                f"study {study.study_name!r} is a search, not a grid of `tauopt reproduce`: "
                "report it alone"
            )
        views += trial_views(study)
        trials = study.get_trials(deepcopy=False)
        for t in trials:  # a run counts once, as in exported_runs
            key = point_key(dict(t.user_attrs.get(GRID_POINT_ATTR) or {}))
            points.add(key)
            finished = t.state == optuna.trial.TrialState.COMPLETE
            if finished and where.setdefault(key, i) != i:
                raise DataError(
                    f"the grid run {key} is finished in both study "
                    f"{studies[where[key]].study_name!r} and "
                    f"study {study.study_name!r}: give each part of a grid once"
                )
        spans += [
            (t.datetime_start, t.datetime_complete)
            for t in trials
            if t.datetime_start and t.datetime_complete
        ]
        failed += [
            (dict(t.user_attrs.get(GRID_POINT_ATTR) or {}), str(t.user_attrs[FAIL_REASON_ATTR]))
            for t in trials
            if t.state == optuna.trial.TrialState.FAIL and FAIL_REASON_ATTR in t.user_attrs
        ]
    names = tuple(f"study {s.study_name!r}" for s in studies)
    return GridRuns(names, tuple(views), tuple(spans), len(points), tuple(failed))


def exported_runs(paths: Sequence[Path]) -> GridRuns:
    """The finished runs of the grid exports at ``paths`` (``tauopt export``), as one grid."""
    parts = [read_export(p) for p in paths]
    # A grid runs in parts, one study per range of seeds, and a part's exported study may still
    # hold as waiting the runs that another part finished: a run counts once, and a run finished
    # in two exports (the same file given twice, say) would count twice in every pair.
    where: dict[str, int] = {}
    for i, part in enumerate(parts):
        for key in part.finished:
            if where.setdefault(key, i) != i:
                raise DataError(
                    f"the grid run {key} is finished in both {parts[where[key]].source} and "
                    f"{part.source}: "
                    "give each finished run once (each part of a grid, each file once)"
                )
    return GridRuns(
        tuple(p.source for p in parts),
        tuple(v for p in parts for v in p.views),
        tuple(s for p in parts for s in p.spans),
        len(frozenset().union(*(p.points for p in parts))),
        tuple(f for p in parts for f in p.failed),
    )


def write_grid_report(runs: GridRuns, out: Path) -> list[Path]:
    """Write a grid's PNG figures and ``report.md`` into ``out``; returns the files."""
    if not runs.views:
        raise ValueError(f"{', '.join(runs.sources)}: no finished run to report on")
    out.mkdir(parents=True, exist_ok=True)
    views = runs.views
    figures = grid_figures(views, out)
    rows = comparisons(views)
    lines = [f"# Reproduction of the papers' experiments: {', '.join(runs.sources)}", ""]
    lines += budget(runs)
    lines += [f"![{f.stem}]({f.name})" for f in figures] + [""]
    lines += reading(rows) + failed_section(runs) + paired_section(views, rows)
    lines += lr_section(views, rows)
    lines += ends_section(views) + clean_loss_section(views)
    lines += regulariser_section(views) + tau_section(views)
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return [*figures, report]


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
        f"{sum(bool(v.record.history.pruned) for v in front)} of those pruned blocks.",
        "",
        *_none_feasible(study, views),
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
        "no block removed": [v for v in feasible if not v.record.history.pruned],
        "blocks removed": [v for v in feasible if v.record.history.pruned],
        "l1 off": [v for v in feasible if not v.record.config.l1],
        "l1 on": [v for v in feasible if v.record.config.l1],
    }
    for name, chosen in groups.items():
        lines.append(
            _row(
                name,
                len(chosen),
                _mean(v.record.final_val_accuracy for v in chosen),
                _mean(
                    v.record.train_accuracy - v.record.test_accuracy
                    for v in chosen
                    if v.record.train_accuracy is not None
                ),
                _mean(float(v.record.blocks_removed) for v in chosen),
            )
        )
    return [*lines, ""]


def _none_feasible(study: optuna.Study, views: Sequence[TrialView]) -> list[str]:
    """Why the front and the table are empty, where no trial is feasible (a short run)."""
    if any(v.feasible for v in views):
        return []
    best = max((v.record.final_val_accuracy for v in views), default=math.nan)
    return [
        f"No trial is feasible yet: every one is below the study's min_val_accuracy = "
        f"{min_val_accuracy(study):g} (the best reached {best:.4f}), so the front is empty "
        "and the table below counts no trial (n = 0). Train longer (`--epochs`, "
        "`--train-size`), or lower `min_val_accuracy` in a new study.",
        "",
    ]


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
    if REPRODUCE_ATTR in study.user_attrs:
        files = write_grid_report(grid_runs([study]), out)
    else:
        report = out / "report.md"
        report.write_text("\n".join(_search_report(study, views, out)) + "\n")
        files = [*sorted(out.glob("*.png")), report]
    publish(study, access(storage_of(study)))
    return files
