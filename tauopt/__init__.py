"""tauopt: hyperparameter studies for networks with learnable time steps.

The training engine lives here; the networks in :mod:`models`, the Optuna study in
:mod:`study`, the storage in :mod:`storage`. The command line is ``tauopt`` (``tauopt.__main__``).
"""

from tauopt._config import ARCHS, TrainConfig
from tauopt._data import DATASETS, RawDataset, Splits, default_data_dir, load_dataset, make_splits
from tauopt._engine import (
    EpochStats,
    PruneEvent,
    TrainResult,
    accuracy,
    build_model,
    resolve_device,
    train,
)
from tauopt.errors import ConfigError, DataError, DivergedError, TauoptError

__all__ = [
    "ARCHS",
    "DATASETS",
    "ConfigError",
    "DataError",
    "DivergedError",
    "EpochStats",
    "PruneEvent",
    "RawDataset",
    "Splits",
    "TauoptError",
    "TrainConfig",
    "TrainResult",
    "accuracy",
    "build_model",
    "default_data_dir",
    "load_dataset",
    "make_splits",
    "resolve_device",
    "train",
]
