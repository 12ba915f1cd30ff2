"""Create a study, or change the budget of an existing one."""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any

import optuna

from tauopt.engine import load_dataset
from tauopt.engine._data import check_split_sizes, is_arrays
from tauopt.errors import ConfigError
from tauopt.storage import StorageSettings, access, open_storage, study_id
from tauopt.study._anchors import enqueue_anchors, plan_anchors
from tauopt.study._config import StudyConfig, parse_config
from tauopt.study._ledger import budget_used
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


def with_dataset_hash(config: StudyConfig, data_dir: Path | None) -> StudyConfig:
    """``config`` with its .npz file's content hash, once the file is checked (against the
    validation split too); a named dataset is left to the workers, which download it."""
    budget = config.trial
    if not is_arrays(budget.dataset):
        return config
    dataset = load_dataset(budget.dataset, data_dir)
    check_split_sizes(dataset, val_size=budget.val_size, train_size=budget.train_size)
    trial = dataclasses.replace(budget, dataset_sha256=str(dataset.sha256))
    return dataclasses.replace(config, trial=trial)


def create_study(
    settings: StorageSettings,
    study_name: str,
    config: StudyConfig,
    *,
    data_dir: Path | None = None,
) -> optuna.Study:
    """Create the schema and the study before workers start.

    Idempotent for the same config. On an existing study the budget (``study.n_trials``) may be
    changed to any total not below the trials already used; any other difference is refused,
    with the keys that differ named.
    """
    quiet_optuna()
    config = with_dataset_hash(config, data_dir)
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
    # both in today's shape: keys added since the study was made take their defaults
    diff = _differences(parse_config(stored).to_dict(), new)
    if not diff:
        study.set_user_attr(CONFIG_ATTR, new)
        return
    if any(not d.startswith("study.n_trials:") for d in diff):
        raise ConfigError(
            f"study {study_name!r} already exists with another configuration "
            f"({'; '.join(diff)}). Only the budget, study.n_trials, can change on an existing "
            "study: put the other keys back, or start a new study with another --study name "
            "(TAUOPT_STUDY in .env under docker compose)"
        )
    counts, own_failures = access(storage).counts(
        study_id(study), failed_with_attr=FAIL_REASON_ATTR
    )
    used = budget_used(counts, own_failures)
    if config.n_trials < used:
        raise ConfigError(
            f"study {study_name!r} has already used {used} trials of its budget; "
            f"n_trials must be at least {used}, got {config.n_trials}"
        )
    study.set_user_attr(CONFIG_ATTR, new)
