"""tauopt: hyperparameter studies for networks with learnable time steps.

The layers, each a subpackage that imports only from those below it::

    tauopt.models    networks (pure PyTorch)
    tauopt.engine    training engine            (uses models)
    tauopt.storage   Optuna storage, artifacts  (uses neither)
    tauopt.study     Optuna study               (uses engine, models, storage)
    tauopt._cli      the ``tauopt`` command     (uses all of them)

:mod:`tauopt.errors` holds the exception types every layer raises; it imports nothing.

The names below are the public API, imported on first use so that ``import tauopt.models``
does not pull in Optuna and ``tauopt --help`` does not pull in torch::

    from tauopt import best_trials, train, TrainConfig
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tauopt.errors import (
    ConfigError,
    DataError,
    DependencyError,
    DivergedError,
    StorageError,
    TauoptError,
)

__version__ = "0.1.0"

#: Public name -> the subpackage that defines it.
_LAZY: dict[str, str] = {
    "TauNetwork": "tauopt.models",
    "TauResNet": "tauopt.models",
    "FractionalDNN": "tauopt.models",
    "TrainConfig": "tauopt.engine",
    "TrainResult": "tauopt.engine",
    "History": "tauopt.engine",
    "EpochStats": "tauopt.engine",
    "load_dataset": "tauopt.engine",
    "train": "tauopt.engine",
    "best_trials": "tauopt.study",
    "TrialResult": "tauopt.study",
    "export_csv": "tauopt.study",
    "load_config": "tauopt.study",
    "StudyConfig": "tauopt.study",
}

if TYPE_CHECKING:
    from tauopt.engine import EpochStats, History, TrainConfig, TrainResult, load_dataset, train
    from tauopt.models import FractionalDNN, TauNetwork, TauResNet
    from tauopt.study import StudyConfig, TrialResult, best_trials, export_csv, load_config

__all__ = [
    "ConfigError",
    "DataError",
    "DependencyError",
    "DivergedError",
    "EpochStats",
    "FractionalDNN",
    "History",
    "StorageError",
    "StudyConfig",
    "TauNetwork",
    "TauResNet",
    "TauoptError",
    "TrainConfig",
    "TrainResult",
    "TrialResult",
    "__version__",
    "best_trials",
    "export_csv",
    "load_config",
    "load_dataset",
    "train",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tauopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
