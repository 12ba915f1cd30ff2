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
    DEFAULT_TRAIN_SIZE,
    OBJECTIVES,
    PARAMS,
    SearchParam,
    StudyConfig,
    TrialBudget,
    load_config,
    parse_config,
)
from tauopt.study._create import check_change, create_study, settle, study_dataset
from tauopt.study._liveness import WorkerStopped
from tauopt.study._objective import objective_values, suggest_config
from tauopt.study._point import GridPoint
from tauopt.study._query import BestTrials, TrialResult, best_trials, export_csv, load_study
from tauopt.study._record import CONFIG_ATTR, INTERNAL_STUDY_ATTRS, TrialRecord
from tauopt.study._reproduce import CELLS, PROTOCOLS, GridRun, enqueue_grid, grid
from tauopt.study._reproduce import DATASETS as PAPER_DATASETS
from tauopt.study._worker import (
    DEFAULT_STOP_GRACE,
    MAX_STOP_GRACE,
    Worker,
    WorkerOptions,
    WorkerSummary,
)


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
    "CONFIG_ATTR",
    "DEFAULT_SEARCH",
    "DEFAULT_STOP_GRACE",
    "DEFAULT_TRAIN_SIZE",
    "INTERNAL_STUDY_ATTRS",
    "MAX_STOP_GRACE",
    "OBJECTIVES",
    "PAPER_DATASETS",
    "PARAMS",
    "PROTOCOLS",
    "BestTrials",
    "GridPoint",
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
    "check_change",
    "create_study",
    "enqueue_grid",
    "export_csv",
    "grid",
    "load_config",
    "load_study",
    "objective_values",
    "parse_config",
    "settle",
    "study_dataset",
    "suggest_config",
    "write_grid_report",
    "write_report",
]
