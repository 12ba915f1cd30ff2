"""Read a study back: the best trials with their networks, and every trial as CSV."""

from __future__ import annotations

import csv
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import optuna
from optuna.artifacts import download_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial

from tauopt.models import TauNetwork
from tauopt.storage import (
    StorageError,
    StorageSettings,
    artifact_store,
    default_artifact_dir,
    open_storage,
    resolve_url,
)
from tauopt.study._budget import ARTIFACT_ATTR, FAIL_REASON_ATTR, RETRY_REASON_ATTR
from tauopt.study._checkpoint import load_checkpoint
from tauopt.study._views import front_numbers


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
    attrs = trial.user_attrs
    return TrialResult(
        number=trial.number,
        params=dict(trial.params),
        val_accuracy=float(attrs["val_accuracy"]),
        test_accuracy=float(attrs["test_accuracy"]),
        active_blocks=int(attrs["active_blocks"]),
        active_params=int(attrs["active_params"]),
        taus=list(attrs["taus"]),
        artifact_id=attrs.get(ARTIFACT_ATTR),
        artifact_dir=artifact_dir,
    )


def best_trials(
    storage: str | optuna.storages.BaseStorage | None,
    study_name: str,
    *,
    artifact_dir: Path | str | None = None,
) -> list[TrialResult]:
    """The Pareto-optimal trials (two objectives) or the best one, by validation accuracy.

    ``storage`` is a URL (default ``$TAUOPT_STORAGE`` or ``./tauopt.db``) or an Optuna storage.
    ``artifact_dir`` defaults to where the workers store models for that URL.
    """
    study = load_study(storage, study_name)
    if artifact_dir is None:
        url = storage.url if isinstance(storage, optuna.storages.RDBStorage) else storage
        artifact_dir = default_artifact_dir(resolve_url(url if isinstance(url, str) else None))
    front = _front(study)
    results = [_summary(t, Path(artifact_dir)) for t in front]
    return sorted(results, key=lambda r: (-r.val_accuracy, r.active_params))


def _front(study: optuna.Study) -> list[FrozenTrial]:
    """The feasible Pareto-optimal trials, or the best feasible one of a single objective:
    a trial below the study's ``min_val_accuracy`` is never among them."""
    numbers = front_numbers(study)
    return [t for t in study.get_trials(deepcopy=False) if t.number in numbers]


_SCALAR_ATTRS = (
    "val_accuracy",
    "test_accuracy",
    "active_blocks",
    "active_params",
    "tau_sum",
    "device",
    "seed",
    FAIL_REASON_ATTR,
    RETRY_REASON_ATTR,
)
_LIST_ATTRS = ("taus", "pruned_layers", "epoch_seconds")


def export_csv(
    storage: str | optuna.storages.BaseStorage | None, study_name: str, out: TextIO
) -> int:
    """Write every trial as a CSV row to ``out``; returns the number of rows.

    ``pareto_optimal`` is true for the trials :func:`best_trials` returns.
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
            "number",
            "state",
            "pareto_optimal",
            "feasible",
            *value_names,
            *(f"param_{p}" for p in param_names),
            *_SCALAR_ATTRS,
            *_LIST_ATTRS,
            "datetime_start",
            "duration_seconds",
        ]
    )
    for t in trials:
        values = t.values if t.values is not None else [None] * n_values
        duration = t.duration.total_seconds() if t.duration is not None else None
        writer.writerow(
            [
                t.number,
                t.state.name,
                t.number in front,
                all(v <= 0.0 for v in t.constraints.values()),
                *values,
                *(t.params.get(p) for p in param_names),
                *(t.user_attrs.get(a) for a in _SCALAR_ATTRS),
                *(json.dumps(t.user_attrs[a]) if a in t.user_attrs else None for a in _LIST_ATTRS),
                t.datetime_start.isoformat() if t.datetime_start else None,
                duration,
            ]
        )
    return len(trials)
