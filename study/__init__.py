"""The Optuna study over variable-time-step networks: config, objective, workers, queries.

>>> from study import best_trials
>>> for trial in best_trials("sqlite:///tauopt.db", "tauopt"):   # doctest: +SKIP
...     print(trial.number, trial.val_accuracy, trial.active_params)
...     model = trial.load_model()
"""

from tauopt.study._config import (
    DEFAULT_SEARCH,
    OBJECTIVES,
    PARAMS,
    SearchParam,
    StudyConfig,
    StudyConfigError,
    TrialBudget,
    load_config,
    parse_config,
)
from tauopt.study._create import create_study
from tauopt.study._liveness import WorkerStopped
from tauopt.study._objective import objective_values, suggest_config, trial_attributes
from tauopt.study._query import TrialResult, best_trials, export_csv, load_study
from tauopt.study._worker import Worker, WorkerOptions, WorkerSummary

__all__ = [
    "DEFAULT_SEARCH",
    "OBJECTIVES",
    "PARAMS",
    "SearchParam",
    "StudyConfig",
    "StudyConfigError",
    "TrialBudget",
    "TrialResult",
    "Worker",
    "WorkerOptions",
    "WorkerStopped",
    "WorkerSummary",
    "best_trials",
    "create_study",
    "export_csv",
    "load_config",
    "load_study",
    "objective_values",
    "parse_config",
    "suggest_config",
    "trial_attributes",
]
