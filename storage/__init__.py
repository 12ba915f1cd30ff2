"""Where studies live: one place turns a URL into an Optuna storage.

SQLite (``tauopt.db`` in the working directory) is the embedded default; PostgreSQL
(``postgresql+psycopg2://...``, from ``--storage`` or ``$TAUOPT_STORAGE``) is for many workers.
"""

from tauopt.errors import StorageError
from tauopt.storage._artifacts import artifact_store
from tauopt.storage._rdb import (
    ARTIFACTS_ENV,
    MAX_STUDY_NAME,
    STORAGE_ENV,
    StorageSettings,
    default_artifact_dir,
    open_storage,
    redact,
    resolve_url,
    set_study_system_attrs,
    set_trial_attrs,
    study_lock,
    trial_counts,
)
from tauopt.storage._retry import (
    RetryPolicy,
    is_storage_error,
    is_transient,
    root_message,
)

__all__ = [
    "ARTIFACTS_ENV",
    "MAX_STUDY_NAME",
    "STORAGE_ENV",
    "RetryPolicy",
    "StorageError",
    "StorageSettings",
    "artifact_store",
    "default_artifact_dir",
    "is_storage_error",
    "is_transient",
    "open_storage",
    "redact",
    "resolve_url",
    "root_message",
    "set_study_system_attrs",
    "set_trial_attrs",
    "study_lock",
    "trial_counts",
]
