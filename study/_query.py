"""Read a study back: the best trials with their networks, and every trial as CSV."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import optuna
from optuna.artifacts import download_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial

from tauopt.engine import TrainConfig
from tauopt.models import TauNetwork
from tauopt.storage import (
    StorageError,
    StorageSettings,
    artifact_store,
    default_artifact_dir,
    open_storage,
    resolve_url,
)
from tauopt.study._checkpoint import load_checkpoint
from tauopt.study._record import (
    CONFIG_ATTR,
    FAIL_REASON_ATTR,
    GRID_CONFIG_ATTR,
    GRID_POINT_ATTR,
    HISTORY_ATTRS,
    RETRY_REASON_ATTR,
    WORKER_ATTR,
    TrialRecord,
)
from tauopt.study._views import front_numbers, settings_line, view_of

#: Optuna's artifact ids are UUIDs: anything else was not written by a worker.
_ARTIFACT_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class TrialResult:
    """One finished trial: its parameters, metrics and a way to get its trained network."""

    number: int
    params: dict[str, Any]
    val_accuracy: float
    test_accuracy: float
    active_blocks: int
    active_params: int
    taus: list[float]
    artifact_id: str | None
    artifact_dir: Path = field(repr=False)

    def load_model(self) -> TauNetwork:
        """The trained (pruned) network of this trial, on the CPU in eval mode.

        Call it on a batch: flattened rows ``(N, 784)`` of floats in [0, 1] (what it was
        trained on), or images ``(N, 28, 28)`` / ``(N, 1, 28, 28)`` as torchvision gives them
        (floats in [0, 1], or uint8 pixels, which it scales). It returns logits ``(N, 10)``::

            with torch.no_grad():
                predicted = model(images).argmax(dim=1)
        """
        if self.artifact_id is None:
            raise StorageError(f"trial {self.number} has no stored model artifact")
        # read from the study's record, which anyone with access may have changed: a number
        # or a list is no id either
        if not isinstance(self.artifact_id, str) or not _ARTIFACT_ID.fullmatch(self.artifact_id):
            raise StorageError(
                f"trial {self.number}'s model id {self.artifact_id!r} is not one a worker "
                "writes (a UUID): the study's record was changed; rerun the trial"
            )
        store = artifact_store(self.artifact_dir, create=False)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.pt"
            try:
                download_artifact(
                    artifact_store=store, file_path=str(path), artifact_id=self.artifact_id
                )
            except (FileNotFoundError, ArtifactNotFound) as e:
                raise StorageError(
                    f"model of trial {self.number} not found in {self.artifact_dir}; pass the "
                    "artifact directory the workers used (--artifact-dir / $TAUOPT_ARTIFACTS)"
                ) from e
            except OSError as e:  # a folder where the file should be, a read error
                raise StorageError(
                    f"model of trial {self.number} in {self.artifact_dir} cannot be read "
                    f"({e.strerror or e}); restore the file {self.artifact_id}"
                ) from e
            return load_checkpoint(path, f"the model of trial {self.number} ({self.artifact_id})")

    def to_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "params": self.params,
            "val_accuracy": self.val_accuracy,
            "test_accuracy": self.test_accuracy,
            "active_blocks": self.active_blocks,
            "active_params": self.active_params,
            "taus": self.taus,
            "artifact_id": self.artifact_id,
        }


def _open(storage: str | optuna.storages.BaseStorage | None) -> optuna.storages.BaseStorage:
    if isinstance(storage, optuna.storages.BaseStorage):
        return storage
    return open_storage(StorageSettings(url=resolve_url(storage)), create_schema=False)


def load_study(storage: str | optuna.storages.BaseStorage | None, study_name: str) -> optuna.Study:
    """Load ``study_name`` for reading; a clear error if it is not there."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=study_name, storage=_open(storage))
    except KeyError:
        raise StorageError(
            f"no study named {study_name!r} in this storage; create it first with "
            f"`tauopt create --study {study_name}`"
        ) from None


def _summary(trial: FrozenTrial, artifact_dir: Path) -> TrialResult:
    record = TrialRecord.from_attrs(trial.user_attrs)
    return TrialResult(
        number=trial.number,
        params=dict(trial.params),
        val_accuracy=float("nan") if record.val_accuracy is None else record.val_accuracy,
        test_accuracy=record.test_accuracy,
        active_blocks=record.active_blocks,
        active_params=record.active_params,
        taus=record.taus,
        artifact_id=record.model_artifact_id,
        artifact_dir=artifact_dir,
    )


class BestTrials(list[TrialResult]):
    """The best trials; where there are none, ``why_empty`` says why."""

    why_empty: str | None = None


def best_trials(
    storage: str | optuna.storages.BaseStorage | None,
    study_name: str,
    *,
    artifact_dir: Path | str | None = None,
) -> BestTrials:
    """The Pareto-optimal trials (two objectives) or the best one, by validation accuracy;
    where there is none, the list's ``why_empty`` says why.

    ``storage`` is a URL (default ``$TAUOPT_STORAGE`` or ``./tauopt.db``) or an Optuna storage.
    ``artifact_dir`` defaults to where the workers store models for that URL.
    """
    study = load_study(storage, study_name)
    if artifact_dir is None:
        url = storage.url if isinstance(storage, optuna.storages.RDBStorage) else storage
        artifact_dir = default_artifact_dir(resolve_url(url if isinstance(url, str) else None))
    front = _front(study)
    results = [_summary(t, Path(artifact_dir)) for t in front]
    best = BestTrials(sorted(results, key=lambda r: (-r.val_accuracy, r.active_params)))
    if not best:
        best.why_empty = why_no_best(study)
    return best


def why_no_best(study: optuna.Study) -> str:
    """Why a study has no best trial yet: nothing finished, or nothing reached its floor."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return f"study {study.study_name!r} has no completed trial yet"
    reached = [TrialRecord.from_attrs(t.user_attrs).val_accuracy for t in complete]
    best = max((a for a in reached if a is not None), default=float("nan"))
    floor = study.user_attrs.get(CONFIG_ATTR, {}).get("study", {}).get("min_val_accuracy")
    return (
        f"all {len(complete)} completed trials of study {study.study_name!r} fall below its "
        f"min_val_accuracy {floor} (the best reached {best:.4f}), so none is feasible: train "
        "longer (--epochs, --train-size), or lower min_val_accuracy in a new study"
    )


def _front(study: optuna.Study) -> list[FrozenTrial]:
    """The feasible Pareto-optimal trials, or the best feasible one of a single objective:
    a trial below the study's ``min_val_accuracy`` is never among them."""
    numbers = front_numbers(study)
    return [t for t in study.get_trials(deepcopy=False) if t.number in numbers]


#: Columns of every trial's settings: every field of its training config, so that rows can
#: be told apart in any study, a grid of ``tauopt reproduce`` included, and so that a report
#: can be made again from the export alone (``tauopt report --trials``).
_CONFIG_COLUMNS = tuple(f.name for f in dataclasses.fields(TrainConfig))
#: The record's values per trial; lists as JSON.
_RECORD_COLUMNS = (
    "val_accuracy",
    "test_accuracy",
    "train_accuracy",
    "active_blocks",
    "active_params",
    "initial_params",
    "tau_sum",
    "device",
    "machine",
    "in_features",
    "num_classes",
)
#: JSON: lists, and the whole training config and grid point (``tauopt report --trials`` reads
#: an export back from them); these first, then the history's other lists in its order.
_LEAD_COLUMNS = (
    "train_config",
    GRID_POINT_ATTR,
    "taus",
    "active_block_ids",
    "pruned_layers",
    "epoch_seconds",
)
_LIST_COLUMNS = (*_LEAD_COLUMNS, *(n for n in HISTORY_ATTRS if n not in _LEAD_COLUMNS))
_REASONS = (FAIL_REASON_ATTR, RETRY_REASON_ATTR, WORKER_ATTR)


def _record_cells(trial: FrozenTrial) -> list[Any]:
    if trial.state != optuna.trial.TrialState.COMPLETE:
        cells: list[Any] = [None] * (1 + len(_CONFIG_COLUMNS) + len(_RECORD_COLUMNS))
        # a grid run that has not finished still says which run it is
        known = {
            "train_config": trial.user_attrs.get(GRID_CONFIG_ATTR),
            GRID_POINT_ATTR: trial.user_attrs.get(GRID_POINT_ATTR),
        }
        return cells + [
            None if known.get(name) is None else json.dumps(known[name]) for name in _LIST_COLUMNS
        ]
    record = TrialRecord.from_attrs(trial.user_attrs)
    config = record.config.to_dict()
    point = None if record.grid_point is None else record.grid_point.as_dict()
    stored = {**record.to_attrs(), GRID_POINT_ATTR: point}
    view = view_of(trial.number, record, feasible=True)
    return [
        settings_line(view),
        *(config[name] for name in _CONFIG_COLUMNS),
        *(getattr(record, name) for name in _RECORD_COLUMNS),
        *(json.dumps(stored[name]) for name in _LIST_COLUMNS),
    ]


def export_csv(
    storage: str | optuna.storages.BaseStorage | None, study_name: str, out: TextIO
) -> int:
    """Write every trial as a CSV row to ``out``; returns the number of rows.

    ``pareto_optimal`` is true for the trials :func:`best_trials` returns; ``settings`` says
    in words what the run trained, and the ``config_*`` columns give each setting.
    """
    study = load_study(storage, study_name)
    trials = study.get_trials(deepcopy=False)
    front = {t.number for t in _front(study)}
    param_names = sorted({name for t in trials for name in t.params})
    n_values = len(study.directions)
    value_names = [f"value_{name}" for name in study.metric_names or range(n_values)]
    writer = csv.writer(out)
    writer.writerow(
        [
            "study",
            "number",
            "state",
            "pareto_optimal",
            "feasible",
            *value_names,
            *(f"param_{p}" for p in param_names),
            "settings",
            *(f"config_{c}" for c in _CONFIG_COLUMNS),
            *_RECORD_COLUMNS,
            *_LIST_COLUMNS,
            *_REASONS,
            "datetime_start",
            "duration_seconds",
        ]
    )
    for t in trials:
        values = t.values if t.values is not None else [None] * n_values
        duration = t.duration.total_seconds() if t.duration is not None else None
        writer.writerow(
            [
                study.study_name,
                t.number,
                t.state.name,
                t.number in front,
                all(v <= 0.0 for v in t.constraints.values()),
                *values,
                *(t.params.get(p) for p in param_names),
                *_record_cells(t),
                *(t.user_attrs.get(a) for a in _REASONS),
                t.datetime_start.isoformat() if t.datetime_start else None,
                duration,
            ]
        )
    return len(trials)
