"""The Optuna study over variable-time-step networks: config, objective, workers, queries.

>>> from tauopt.study import best_trials
>>> for trial in best_trials("sqlite:///tauopt.db", "tauopt"):   # doctest: +SKIP
...     print(trial.number, trial.val_accuracy, trial.active_params)
...     model = trial.load_model()
"""

from collections.abc import Sequence
from pathlib import Path

import optuna

from tauopt.study._config import (
    DEFAULT_SEARCH,
    OBJECTIVES,
    PARAMS,
    SearchParam,
    StudyConfig,
    TrialBudget,
    load_config,
    parse_config,
)
from tauopt.study._create import create_study
from tauopt.study._liveness import WorkerStopped
from tauopt.study._objective import objective_values, suggest_config
from tauopt.study._query import BestTrials, TrialResult, best_trials, export_csv, load_study
from tauopt.study._record import TrialRecord
from tauopt.study._reproduce import CELLS, PROTOCOLS, GridRun, enqueue_grid, grid
from tauopt.study._worker import Worker, WorkerOptions, WorkerSummary


def write_report(study: optuna.Study, out: Path) -> list[Path]:
    """See :func:`tauopt.study._report.write_report` (imported on use: it loads matplotlib)."""
    from tauopt.study._report import write_report as write

    return write(study, out)


def write_grid_report(
    out: Path,
    *,
    studies: Sequence[optuna.Study] = (),
    exports: Sequence[Path] = (),
) -> list[Path]:
    """The report of one grid run in parts: the runs of several ``tauopt reproduce``
    studies, or of their exports (``tauopt export``), as one grid (see
    :mod:`tauopt.study._report`)."""
    from tauopt.study._report import exported_runs, grid_runs
    from tauopt.study._report import write_grid_report as write

    if bool(studies) == bool(exports):
        raise ValueError("give the studies or the exports of a grid, one of the two")
    return write(grid_runs(studies) if studies else exported_runs(exports), out)


__all__ = [
    "CELLS",
    "DEFAULT_SEARCH",
    "OBJECTIVES",
    "PARAMS",
    "PROTOCOLS",
    "BestTrials",
    "GridRun",
    "SearchParam",
    "StudyConfig",
    "TrialBudget",
    "TrialRecord",
    "TrialResult",
    "Worker",
    "WorkerOptions",
    "WorkerStopped",
    "WorkerSummary",
    "best_trials",
    "create_study",
    "enqueue_grid",
    "export_csv",
    "grid",
    "load_config",
    "load_study",
    "objective_values",
    "parse_config",
    "suggest_config",
    "write_grid_report",
    "write_report",
]
