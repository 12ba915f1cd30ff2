"""Where studies live: one place turns a URL into an Optuna storage.

SQLite (``tauopt.db`` in the working directory) is the embedded default; PostgreSQL
(``postgresql://...``, from ``--storage`` or ``$TAUOPT_STORAGE``) is for many workers.
Everything taken from Optuna's private API is in :mod:`tauopt.storage._optuna`, checked when
it is first imported.
"""

from tauopt.errors import StorageError
from tauopt.storage._access import (
    HEARTBEAT_ATTR,
    OVER_BUDGET_ATTR,
    ClaimView,
    DirectAccess,
    ProxyAccess,
    StudyAccess,
    access,
    over_budget,
)
from tauopt.storage._artifacts import artifact_store
from tauopt.storage._optuna import (
    HISTORY_WINDOW,
    RETRIED_FROM,
    WindowedTPESampler,
    as_claimed,
    constraint_attrs,
    constraint_key,
    figure_attrs,
    first_note_attrs,
    pareto_front,
    rdb_of,
    running_trials,
    set_study_system_attrs,
    set_trial_attrs,
    stale_trial_ids,
    storage_of,
    study_id,
    take_waiting,
    trial_counts,
    trial_id,
    with_heartbeat,
)
from tauopt.storage._proxy import SECRET_ENV as PROXY_SECRET_ENV
from tauopt.storage._proxy import bind_address, proxy_secret
from tauopt.storage._proxy import is_public as is_public_host
from tauopt.storage._proxy import serve as serve_proxy
from tauopt.storage._rdb import (
    ARTIFACTS_ENV,
    MAX_STUDY_NAME,
    STORAGE_ENV,
    StorageSettings,
    default_artifact_dir,
    normalize_url,
    open_storage,
    redact,
    resolve_url,
    study_lock,
)
from tauopt.storage._retry import (
    RetryPolicy,
    is_storage_error,
    is_transient,
    root_message,
)

__all__ = [
    "ARTIFACTS_ENV",
    "HEARTBEAT_ATTR",
    "HISTORY_WINDOW",
    "MAX_STUDY_NAME",
    "OVER_BUDGET_ATTR",
    "PROXY_SECRET_ENV",
    "RETRIED_FROM",
    "STORAGE_ENV",
    "ClaimView",
    "DirectAccess",
    "ProxyAccess",
    "RetryPolicy",
    "StorageError",
    "StorageSettings",
    "StudyAccess",
    "WindowedTPESampler",
    "access",
    "artifact_store",
    "as_claimed",
    "bind_address",
    "constraint_attrs",
    "constraint_key",
    "default_artifact_dir",
    "figure_attrs",
    "first_note_attrs",
    "is_public_host",
    "is_storage_error",
    "is_transient",
    "normalize_url",
    "open_storage",
    "over_budget",
    "pareto_front",
    "proxy_secret",
    "rdb_of",
    "redact",
    "resolve_url",
    "root_message",
    "running_trials",
    "serve_proxy",
    "set_study_system_attrs",
    "set_trial_attrs",
    "stale_trial_ids",
    "storage_of",
    "study_id",
    "study_lock",
    "take_waiting",
    "trial_counts",
    "trial_id",
    "with_heartbeat",
]
