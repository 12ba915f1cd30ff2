"""The training engine: a frozen :class:`TrainConfig` and a dataset in, a :class:`TrainResult` out.

Layer: it uses the networks (:mod:`tauopt.models`) and the exception types (:mod:`tauopt.errors`),
and nothing above it (no Optuna, no storage, no command line).
"""

from tauopt.engine._config import (
    ARCHS,
    DEFAULT_VAL_CAP,
    PRECISIONS,
    PRUNE_RULES,
    TrainConfig,
    default_val_size,
)
from tauopt.engine._data import (
    DATASETS,
    RawDataset,
    Splits,
    default_data_dir,
    load_dataset,
    make_splits,
)
from tauopt.engine._history import History, PruneEvent
from tauopt.engine._loop import (
    EpochStats,
    RunStoppedError,
    TrainResult,
    accuracy,
    result_data,
)
from tauopt.engine._population import group_key, train_population
from tauopt.engine._state import Checkpointing, RunPausedError, RunState
from tauopt.engine._train import (
    MAX_THREADS,
    build_model,
    check_state,
    parameter_count,
    resolve_device,
    set_threads,
    train,
)

__all__ = [
    "ARCHS",
    "DATASETS",
    "DEFAULT_VAL_CAP",
    "MAX_THREADS",
    "PRECISIONS",
    "PRUNE_RULES",
    "Checkpointing",
    "EpochStats",
    "History",
    "PruneEvent",
    "RawDataset",
    "RunPausedError",
    "RunState",
    "RunStoppedError",
    "Splits",
    "TrainConfig",
    "TrainResult",
    "accuracy",
    "build_model",
    "check_state",
    "default_data_dir",
    "default_val_size",
    "group_key",
    "load_dataset",
    "make_splits",
    "parameter_count",
    "resolve_device",
    "result_data",
    "set_threads",
    "train",
    "train_population",
]
