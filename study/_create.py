"""Create a study, or change the budget of an existing one."""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any

import optuna

from tauopt.engine import RawDataset, default_val_size, load_dataset
from tauopt.engine._data import TRAIN_IMAGES, check_split_sizes, is_arrays
from tauopt.errors import ConfigError, StorageError
from tauopt.storage import (
    StorageSettings,
    access,
    is_storage_error,
    open_storage,
    study_id,
)
from tauopt.study._anchors import enqueue_anchors, plan_anchors
from tauopt.study._config import DEFAULT_TRAIN_SIZE, StudyConfig, parse_config
from tauopt.study._objective import DIRECTIONS, METRIC_NAMES
from tauopt.study._record import CONFIG_ATTR, FAIL_REASON_ATTR


def quiet_optuna() -> None:
    # Optuna logs every trial at INFO; the worker prints its own one-line summary instead.
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _differences(stored: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``table.key: stored -> new`` for every key whose value differs, in the TOML's terms."""
    out = []
    for table in sorted(set(stored) | set(new)):
        old_t, new_t = stored.get(table, {}), new.get(table, {})
        for key in sorted(set(old_t) | set(new_t)):
            if old_t.get(key) != new_t.get(key):
                out.append(f"{table}.{key}: {old_t.get(key)!r} -> {new_t.get(key)!r}")
    return out


def settle(config: StudyConfig, dataset: RawDataset | None) -> StudyConfig:
    """``config`` as its workers will train it: the validation size settled on the dataset's
    training split where it is unset (:func:`tauopt.engine.default_val_size`), the training
    size too (:data:`DEFAULT_TRAIN_SIZE`, or what the validation images leave where that is
    fewer), and a user's
    .npz file, ``dataset`` (loaded by the caller), checked against the split sizes and
    identified by its content hash. A named dataset is left to the workers, which download
    it: its training split's size is known."""
    budget = config.trial
    if is_arrays(budget.dataset) and (dataset is None or dataset.name != budget.dataset):
        raise ConfigError(f"settling a study on {budget.dataset} needs that file loaded")
    images = len(dataset.train) if dataset is not None else TRAIN_IMAGES[budget.dataset]
    val_size = budget.val_size if budget.val_size is not None else default_val_size(images)
    train_size = budget.train_size
    if train_size is None:
        train_size = min(DEFAULT_TRAIN_SIZE, max(1, images - val_size))
    budget = dataclasses.replace(budget, val_size=val_size, train_size=train_size)
    if dataset is not None and is_arrays(budget.dataset):
        check_split_sizes(dataset, val_size=val_size, train_size=budget.train_images)
        budget = dataclasses.replace(budget, dataset_sha256=str(dataset.sha256))
    return dataclasses.replace(config, trial=budget)


def study_dataset(config: StudyConfig, data_dir: Path | None) -> RawDataset | None:
    """The user's .npz file a study trains on, loaded (and checked); None for a named dataset,
    which ``create`` leaves to the workers."""
    if not is_arrays(config.trial.dataset):
        return None
    return load_dataset(config.trial.dataset, data_dir)


def create_study(
    settings: StorageSettings,
    study_name: str,
    config: StudyConfig,
    *,
    data_dir: Path | None = None,
    dataset: RawDataset | None = None,
) -> optuna.Study:
    """Create the schema and the study before workers start.

    The stored config is settled (:func:`settle`): a user's .npz file is read from
    ``data_dir`` unless the caller has ``dataset`` loaded already.

    Idempotent for the same config. On an existing study the budget (``study.n_trials``) may be
    changed to any total not below the trials already used; any other difference is refused,
    with the keys that differ named.
    """
    quiet_optuna()
    if is_arrays(config.trial.dataset) and (
        dataset is None or dataset.name != config.trial.dataset
    ):
        dataset = study_dataset(config, data_dir)
    config = settle(config, dataset)
    storage = open_storage(settings, create_schema=True)
    # Under the study's lock: processes that create the same study at the same moment see it
    # either absent or complete with its config, never in between.
    with access(storage).lock(study_name):
        try:
            study = optuna.create_study(
                storage=storage, study_name=study_name, directions=DIRECTIONS[config.objective]
            )
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=study_name, storage=storage)
            _update_existing(storage, study, study_name, config)
            if access(storage).locks:  # anchors a failed create left half-enqueued
                enqueue_anchors(study, config)
            return study
        _label(study, config)
        plan_anchors(study, config)
        enqueue_anchors(study, config)
    return study


def _label(study: optuna.Study, config: StudyConfig) -> None:
    """Store the config (what makes the study tauopt's) and the objectives' names."""
    study.set_user_attr(CONFIG_ATTR, config.to_dict())
    with warnings.catch_warnings():  # experimental, but it labels the dashboard's axes
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(METRIC_NAMES[config.objective])


def _half_made(
    storage: optuna.storages.BaseStorage, study: optuna.Study, config: StudyConfig
) -> bool:
    """A study without a config that a ``create`` left half-made (it failed between creating
    the study and labelling it; a retry lands here): under the lock, with no trials and the
    objective's directions, nothing can be lost by finishing it."""
    return (
        access(storage).locks
        and [d.name.lower() for d in study.directions] == DIRECTIONS[config.objective]
        and not study.get_trials(deepcopy=False)
    )


def _stored_config(
    storage: optuna.storages.BaseStorage, study: optuna.Study
) -> dict[str, Any] | None:
    """The study's stored config. Without a lock (through the proxy) the process that made the
    study may not have stored it yet: wait a little for it."""
    for _ in range(20):
        stored = storage.get_study_user_attrs(study_id(study)).get(CONFIG_ATTR)
        if stored is not None or access(storage).locks:
            return stored
        time.sleep(0.25)
    return None


def _update_existing(
    storage: optuna.storages.BaseStorage, study: optuna.Study, study_name: str, config: StudyConfig
) -> None:
    stored = _stored_config(storage, study)
    new = config.to_dict()
    if stored is None and _half_made(storage, study, config):
        _label(study, config)
        plan_anchors(study, config)  # the caller enqueues them, under the same lock
        return
    if stored is None:
        raise ConfigError(
            f"study {study_name!r} exists but was not created by tauopt; pick another --study name"
        )
    if stored == new:
        return
    if not _other_changes(study_name, stored, new):
        study.set_user_attr(CONFIG_ATTR, new)
        return
    # Counted and stored at once, under the study's lock (the proxy takes it there), so that
    # no claim checks its place against the old budget in between.
    used = access(storage).set_budget(
        study_id(study), CONFIG_ATTR, new, config.n_trials, failed_with_attr=FAIL_REASON_ATTR
    )
    if config.n_trials < used:
        raise ConfigError(
            f"study {study_name!r} has already used {used} trials of its budget; "
            f"n_trials must be at least {used}, got {config.n_trials}"
        )


def _other_changes(study_name: str, stored: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys in which ``new`` differs from the ``stored`` config; a difference in anything
    but the budget (``study.n_trials``) is refused."""
    # both in today's shape: keys added since the study was made take their defaults
    diff = _differences(parse_config(stored).to_dict(), new)
    if any(not d.startswith("study.n_trials:") for d in diff):
        raise ConfigError(
            f"study {study_name!r} already exists with another configuration "
            f"({'; '.join(diff)}). Only the budget, study.n_trials, can change on an existing "
            "study: put the other keys back, or start a new study with another --study name "
            "(TAUOPT_STUDY in .env under docker compose)"
        )
    return diff


def check_change(settings: StorageSettings, study_name: str, config: StudyConfig) -> None:
    """Refuse now, reading only, a settled ``config`` that :func:`create_study` would refuse
    for the existing study of that name: so that a command can check it before work that
    comes first (loading, downloading) and fail without having changed anything. Where
    there is no such study, or no database yet, there is nothing to check."""
    try:
        storage = open_storage(settings, create_schema=False)
        sid = storage.get_study_id_from_name(study_name)
        stored = storage.get_study_user_attrs(sid).get(CONFIG_ATTR)
    except (KeyError, StorageError):
        return
    except Exception as e:
        if is_storage_error(e):  # no tables yet, or the database away: create will tell
            return
        raise
    if stored is not None and stored != config.to_dict():
        _other_changes(study_name, stored, config.to_dict())
