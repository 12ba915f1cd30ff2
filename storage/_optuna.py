"""Everything tauopt takes from Optuna's and optuna-dashboard's private API and tables.

No other module of tauopt touches a private name of either library or writes SQL against
Optuna's schema (``tests/test_packaging.py`` fails otherwise). Each name is here for what it
buys over the public call that does the same job, timed side by side (public / tauopt, in a
SQLite study of 5,000 trials, 2026-12-07, 2-core CPU: ``benchmarks/private_api.py`` and
``sampler_compare.py``; the table with every name is in docs/architecture.md, "The private
surface"):

* ``_create_scoped_session`` and the attribute models (:func:`set_trial_attrs`,
  :func:`stamp_running`): a trial's record in one transaction under its row lock, so that a
  late write never lands on a trial finished meanwhile; 2.4x against ``set_user_attr`` per
  attribute, and through the proxy one call per trial instead of 25;
* ``StudySystemAttributeModel`` and optuna-dashboard's figure and note keys
  (:func:`figure_attrs`, :func:`first_note_attrs`, :func:`set_study_system_attrs`): 6.2x
  against ``save_plotly_graph_object``, 1.8x against ``save_note``;
* SQL on Optuna's tables (:func:`trial_counts`, :func:`budget_before`, ...): a claim's
  questions answered by the database as it is, inside the claim's lock, without every trial
  in a cache (1.2x only, against a warm cache: the point is the locked read);
* ``_CONSTRAINTS_KEY`` (:func:`constraint_attrs`): the constraint with the record, also in the
  list form that optuna-dashboard alone reads (``set_constraint`` does not write it);
* ``_get_pareto_front_trials_by_trials`` (:func:`pareto_front`): 59x against
  ``study.best_trials``, which deep-copies every trial;
* TPE's internals (:class:`WindowedTPESampler`): against Optuna 5's default TPE, 3.6x per
  ask at 1,000 trials and 15.5x at 10,000, with the same proposals within the window (five
  seeds of 100 trials: the same fronts);
* ``_CachedStorage``, its ``_StudyInfo`` and ``RDBStorage._get_trials`` (:class:`CoalescedCache`):
  10.7x for 32 requests at once; running trials read whole only when they changed (the
  read's share of the proxy's CPU per trial 130 against 82 ms at 500 workers);
* the gRPC servicer, stub, client cache and channel (:func:`proxy_server_with`,
  :class:`GrpcClient`): the shared secret and tauopt's service on the proxy's port, which
  ``run_grpc_proxy_server`` and ``GrpcStorageProxy`` cannot take;
* ``_get_stale_trial_ids`` (:func:`stale_trial_ids`): which trials are dead, so that the
  worker requeues them itself (``fail_stale_trials`` says nothing of which);
* ``Study._storage``, ``_study_id``, ``Trial._trial_id``: ids, which have no public accessor.
* ``Study._thread_local`` (:func:`take_waiting`, :func:`trial_of`): a waiting trial taken by
  its id, as ``ask()`` takes one, without ``ask()``'s new trial when another worker took it
  first; a trial the proxy made in one call, as ``ask()`` makes one.
* ``RDBStorage._set_trial_param_without_commit`` (:func:`set_trial_params`): a trial's
  parameters in one transaction, through the proxy one call instead of one per parameter;
* ``Trial._cached_frozen_trial`` (:func:`as_claimed`, read with ``getattr`` and a fallback):
  a claimed trial's attributes as Optuna read them to make it, without a second read.

:func:`check` runs once, when this module is imported: it verifies the versions and every
name, arity and schema version used here, and a mismatch raises :class:`DependencyError` with
one line naming the supported versions, before any command touches a study.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import importlib.metadata
import inspect
import json
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Container, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import optuna
import sqlalchemy
import sqlalchemy.dialects.mysql
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tauopt.errors import DependencyError

#: The releases the tests pass on (``pyproject.toml`` pins the same ranges).
SUPPORTED: dict[str, str] = {"optuna": ">=5.0,<5.1", "optuna-dashboard": ">=0.20,<0.22"}
#: Optuna's RDB schema that the SQL below is written against.
SCHEMA_VERSION = 12


def _require(ok: bool, what: str) -> None:
    if not ok:
        versions = "; ".join(f"{name} {spec}" for name, spec in SUPPORTED.items())
        installed = "; ".join(f"{name} {importlib.metadata.version(name)}" for name in SUPPORTED)
        raise DependencyError(
            f"tauopt needs {versions} (installed: {installed}): {what}; install a supported "
            "version (pip install -c constraints.txt tauopt)"
        )


def _arity(fn: Any) -> int:
    return len(inspect.signature(fn).parameters)


def check() -> None:
    """Verify what this module relies on; raise :class:`DependencyError` if anything differs."""
    for name, spec in SUPPORTED.items():
        version = Version(importlib.metadata.version(name))
        _require(version in SpecifierSet(spec), f"{name} {version} is not supported")
    from optuna.samplers._tpe import sampler as tpe
    from optuna.storages._grpc import client as grpc_client
    from optuna.storages._grpc import servicer as grpc_servicer
    from optuna.storages._grpc.auto_generated import api_pb2_grpc
    from optuna.storages._rdb import models, storage
    from optuna.study import _constrained_optimization, _multi_objective
    from optuna_dashboard import _custom_plot_data, _note, _serializer

    _require(models.SCHEMA_VERSION == SCHEMA_VERSION, "Optuna's database schema changed")
    _require(
        getattr(_serializer, "CONSTRAINTS_KEY", None)
        == getattr(_constrained_optimization, "_CONSTRAINTS_KEY", None),
        "optuna-dashboard no longer reads a trial's constraints where Optuna writes them",
    )
    for owner, names in (
        (storage, ["_create_scoped_session"]),
        (
            optuna.storages.RDBStorage,
            ["_get_stale_trial_ids"],
        ),
        (
            models,
            [
                "TrialModel",
                "TrialUserAttributeModel",
                "TrialSystemAttributeModel",
                "StudySystemAttributeModel",
            ],
        ),
        (_constrained_optimization, ["_CONSTRAINTS_KEY", "_is_constrained_optimization"]),
        (_multi_objective, ["_get_pareto_front_trials_by_trials"]),
        (tpe, ["_split_trials", "default_gamma", "default_gamma_multiobjective"]),
        (
            optuna.samplers.TPESampler,
            ["_sample", "_build_parzen_estimator", "_compute_acquisition_func", "_compare"],
        ),
        (optuna.samplers.TPESampler, ["_get_internal_repr"]),
        (optuna.storages._CachedStorage, ["_read_trials_from_remote_storage"]),
        (optuna.storages._CachedStorage, ["_add_trials_to_cache"]),
        (optuna.storages.RDBStorage, ["_get_trials", "_set_trial_param_without_commit"]),
        (_custom_plot_data, ["SYSTEM_ATTR_PLOT_DATA", "split_plot_data"]),
        (_note, ["note_ver_key", "split_body"]),
        (grpc_servicer, ["OptunaStorageProxyService"]),
        (api_pb2_grpc, ["add_StorageServiceServicer_to_server", "StorageServiceStub"]),
        (grpc_client, ["GrpcClientCache", "create_insecure_channel"]),
        (optuna.storages.GrpcStorageProxy, ["_setup"]),
    ):
        for name in names:
            _require(hasattr(owner, name), f"{owner.__name__}.{name} is missing")
    for fn, n in (
        (tpe._split_trials, 3),
        (optuna.samplers.TPESampler._sample, 4),
        (optuna.samplers.TPESampler._build_parzen_estimator, 5),
        (optuna.samplers.TPESampler._get_internal_repr, 4),
        (_multi_objective._get_pareto_front_trials_by_trials, 3),
        (_custom_plot_data.split_plot_data, 2),
        (_note.split_body, 2),
        (_note.note_ver_key, 1),
        (optuna.storages._CachedStorage._read_trials_from_remote_storage, 2),
        (optuna.storages._CachedStorage._add_trials_to_cache, 3),
        (optuna.storages.RDBStorage._get_trials, 5),
        (optuna.storages.RDBStorage._set_trial_param_without_commit, 7),
        (grpc_servicer.OptunaStorageProxyService, 1),
        (optuna.storages.GrpcStorageProxy._setup, 1),
        (grpc_client.GrpcClientCache, 1),
    ):
        _require(_arity(fn) == n, f"{fn.__qualname__} takes {_arity(fn)} arguments, not {n}")
    local = getattr(optuna.study.study, "_ThreadLocalStudyAttribute", None)
    _require(hasattr(local, "cached_all_trials"), "Study has no cache of its trials to reset")
    sampler = optuna.samplers.TPESampler()
    for name in ("_constant_liar", "_gamma", "_multivariate", "_rng", "_n_ei_candidates"):
        _require(hasattr(sampler, name), f"TPESampler has no {name}")
    cached = optuna.storages._CachedStorage.__init__
    _require("backend" in inspect.signature(cached).parameters, "_CachedStorage changed")
    from optuna.storages import _cached_storage

    _require(hasattr(_cached_storage, "_StudyInfo"), "_cached_storage._StudyInfo is missing")
    entry = _cached_storage._StudyInfo()
    for name in ("trials", "unfinished_trial_ids", "last_finished_trial_id"):
        _require(hasattr(entry, name), f"_StudyInfo has no {name}")


check()

# Imported only once check() has passed.
from optuna.samplers._tpe import sampler as _tpe  # noqa: E402
from optuna.storages import _cached_storage  # noqa: E402
from optuna.storages._grpc import client as _grpc_client  # noqa: E402
from optuna.storages._grpc import servicer as _grpc_servicer  # noqa: E402
from optuna.storages._grpc.auto_generated import api_pb2_grpc as _api_pb2_grpc  # noqa: E402
from optuna.storages._rdb import models as _models  # noqa: E402
from optuna.storages._rdb import storage as _rdb_storage  # noqa: E402
from optuna.study._constrained_optimization import (  # noqa: E402
    _CONSTRAINTS_KEY,
    _is_constrained_optimization,
)
from optuna.study._multi_objective import _get_pareto_front_trials_by_trials  # noqa: E402

# -- handles: ids and the storage behind a study ---------------------------------------------


def rdb_of(storage: optuna.storages.BaseStorage) -> optuna.storages.RDBStorage:
    """The RDB storage itself (``optuna.load_study`` wraps one in a cache)."""
    backend = getattr(storage, "_backend", storage)
    if not isinstance(backend, optuna.storages.RDBStorage):
        raise TypeError(f"tauopt workers need an RDB storage, got {type(storage).__name__}")
    return backend


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    return study._storage


def study_id(study: optuna.Study) -> int:
    return study._study_id


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    return trial._trial_id


#: Optuna's system attributes of a trial: the parameters ``enqueue_trial`` fixed, and the number
#: of the trial a retry (``RetryHeartbeatStaleTrialCallback``) reruns.
_FIXED_PARAMS = "fixed_params"
RETRIED_FROM = "failed_trial"


def take_waiting(study: optuna.Study, trial_id: int) -> optuna.Trial | None:
    """Waiting trial ``trial_id`` taken, as ``Study.ask`` takes the first of the queue; None
    if another worker took or finished it first. Where ``ask`` makes a new trial when the
    queue it read is empty by now, this makes none: at a study's end, hundreds of workers
    racing for one rerun through the proxy made as many new trials, each failed past the
    budget (1,411 in a study of 1,500 with 500 workers)."""
    storage = storage_of(study)
    if isinstance(storage, optuna.storages._CachedStorage):
        # Optuna's cache of a database writes a parameter only for a trial it has read, as
        # ask() reads the queue through it first: the same read
        storage.get_all_trials(study_id(study), deepcopy=False, states=(TrialState.WAITING,))
    try:
        if not storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
            return None
    except optuna.exceptions.UpdateFinishedTrialError:
        return None
    return trial_of(study, trial_id)


def trial_of(study: optuna.Study, trial_id: int) -> optuna.Trial:
    """``optuna.Trial`` of running trial ``trial_id``, as ``ask()`` makes one: the sampler
    reads the study afresh for it."""
    study._thread_local.cached_all_trials = None
    return optuna.Trial(study, trial_id)


def as_claimed(trial: optuna.Trial) -> FrozenTrial | None:
    """``trial`` as ``optuna.Trial`` read it when it was made (its attributes as at its
    claim), without reading it again: through the proxy a running trial's read is a call and
    some 3.5 ms of the proxy's CPU. None where Optuna keeps no such copy."""
    found = getattr(trial, "_cached_frozen_trial", None)
    return found if isinstance(found, FrozenTrial) else None


def is_rdb(storage: optuna.storages.BaseStorage) -> bool:
    """Whether ``storage`` is (or caches) a database, as opposed to a proxy's client."""
    return isinstance(getattr(storage, "_backend", storage), optuna.storages.RDBStorage)


def is_new(trial: FrozenTrial) -> bool:
    """Whether ``ask()`` made ``trial`` afresh: not enqueued, not a retry."""
    return _FIXED_PARAMS not in trial.system_attrs and RETRIED_FROM not in trial.system_attrs


def constraint_key(name: str) -> str:
    """The system attribute that ``trial.set_constraint(name, value)`` writes."""
    return f"{_CONSTRAINTS_KEY}:{name}"


def constraint_attrs(name: str, value: float) -> dict[str, Any]:
    """The system attributes of a trial's one constraint ``name``: the key that
    ``trial.set_constraint(name, value)`` writes, and the list of Optuna's older form, the
    only one optuna-dashboard reads (without it the dashboard's own Pareto plot colours an
    infeasible trial as feasible). Optuna reads both: ``trial.constraints`` holds the value
    under ``name`` and under ``"0"``."""
    return {constraint_key(name): value, _CONSTRAINTS_KEY: [value]}


# -- several attributes in one transaction ---------------------------------------------------


def set_trial_attrs(
    storage: optuna.storages.RDBStorage,
    trial_id: int,
    *,
    user: dict[str, Any] | None = None,
    system: dict[str, Any] | None = None,
) -> None:
    """Set many attributes of a running trial in one transaction: the trial looked up once,
    then one upsert statement for each kind (Optuna's per-attribute upsert looks the trial up
    again for every attribute: three statements each, half the proxy's time on a finished
    trial's record). KeyError for an unknown trial, ``UpdateFinishedTrialError`` for a
    finished one, as Optuna's. The trial's row is locked for the check and the writes, as
    Optuna's ``set_trial_state_values`` locks it to finish the trial: attributes never land
    on a trial finished meanwhile (Optuna's own attribute writes check without the lock), so
    a finished trial that a proxy's cache keeps as it read it never changes afterwards."""
    if not _has_upsert(storage.engine.name):
        # a database without an upsert: Optuna's public calls, a commit each, checked unlocked
        for key, value in (user or {}).items():
            storage.set_trial_user_attr(trial_id, key, value)
        for key, value in (system or {}).items():
            storage.set_trial_system_attr(trial_id, key, value)
        return
    with _rdb_storage._create_scoped_session(storage.scoped_session, True) as session:
        trial = _models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
        state: Any = trial.state  # a TrialState (the column's Enum type)
        storage.check_trial_is_updatable(trial_id, state)
        for model, attrs in (
            (_models.TrialUserAttributeModel, user or {}),
            (_models.TrialSystemAttributeModel, system or {}),
        ):
            if attrs:
                rows = [
                    {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
                    for key, value in attrs.items()
                ]
                session.execute(_upsert(storage.engine.name, model, rows))


def _conflict_dialects() -> dict[str, Any]:
    """The databases with ``INSERT ... ON CONFLICT`` (SQLite from 3.24), by dialect name."""
    dialects: dict[str, Any] = {"postgresql": sqlalchemy.dialects.postgresql}
    if sqlite3.sqlite_version_info >= (3, 24, 0):
        dialects["sqlite"] = sqlalchemy.dialects.sqlite
    return dialects


def _has_upsert(dialect: str) -> bool:
    """Whether :func:`_upsert` has a statement for the database ``dialect``."""
    return dialect == "mysql" or dialect in _conflict_dialects()


def _upsert(dialect: str, model: Any, rows: list[dict[str, Any]] | sqlalchemy.Select[Any]) -> Any:
    """An INSERT of ``rows`` (dicts, or a SELECT of trial_id, key, value_json) into a trial
    attribute table that replaces the value of a key the trial has already: the upsert Optuna
    writes for one attribute, for many. None where the database has none."""

    def fill(insert: Any) -> Any:
        if isinstance(rows, list):
            return insert.values(rows)
        return insert.from_select(["trial_id", "key", "value_json"], rows)

    dialects = _conflict_dialects()
    if dialect in dialects:
        insert = fill(dialects[dialect].insert(model))
        return insert.on_conflict_do_update(
            index_elements=[model.trial_id, model.key],
            set_={"value_json": insert.excluded.value_json},
        )
    if dialect == "mysql":
        insert = fill(sqlalchemy.dialects.mysql.insert(model))
        return insert.on_duplicate_key_update(value_json=insert.inserted.value_json)
    return None


def stamp_running(storage: optuna.storages.RDBStorage, trial_ids: Sequence[int], key: str) -> None:
    """Set system attribute ``key`` of each of ``trial_ids`` that still runs to this host's
    clock now (seconds since the epoch), in one statement (an upsert of the running ones);
    finished or unknown trials are left alone. A heartbeat stamped where the dead-trial check
    reads it: one clock for every worker's stamps. The running trials' rows are locked as
    they are chosen (as in :func:`set_trial_attrs`): a trial finished meanwhile is left alone."""
    if not trial_ids:
        return
    model, trials = _models.TrialSystemAttributeModel, _models.TrialModel
    now = time.time()
    ours = (trials.trial_id.in_(list(trial_ids)), trials.state == TrialState.RUNNING)
    running = (
        sqlalchemy.select(
            trials.trial_id, sqlalchemy.literal(key), sqlalchemy.literal(json.dumps(now))
        )
        .where(*ours)
        .with_for_update()
    )
    statement = _upsert(storage.engine.name, model, running)
    if statement is None:  # a database without an upsert: Optuna's public call, one by one
        with storage.engine.connect() as conn:
            chosen = list(conn.execute(sqlalchemy.select(trials.trial_id).where(*ours)).scalars())
        for tid in chosen:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                storage.set_trial_system_attr(int(tid), key, now)  # finished meanwhile
        return
    with storage.engine.begin() as conn:
        conn.execute(statement)


def set_trial_params(
    storage: optuna.storages.BaseStorage,
    trial_id: int,
    params: Sequence[tuple[str, float, BaseDistribution]],
    previous: dict[str, BaseDistribution] | None = None,
) -> None:
    """Parameters (name, internal value, distribution) of a running trial in one transaction,
    each checked as Optuna's ``set_trial_param`` checks it (the trial known and running, the
    distribution compatible with the study's earlier one of that name: from ``previous``
    where it names one, as Optuna's cache passes its own, else from the database); Optuna
    writes one per call, each in a transaction of its own. A name the trial has already is
    skipped: the call repeated after its answer was lost."""
    rdb = rdb_of(storage)
    model = _models.TrialParamModel
    previous = previous or {}
    with _rdb_storage._create_scoped_session(rdb.scoped_session, True) as session:
        query = session.query(model.param_name).filter(model.trial_id == trial_id)
        have = {name for (name,) in query}
        for name, value, dist in params:
            if name not in have:
                before = previous.get(name)
                rdb._set_trial_param_without_commit(session, trial_id, name, value, dist, before)
                have.add(name)


def set_study_system_attrs(
    storage: optuna.storages.RDBStorage,
    study_id: int,
    attrs: dict[str, Any],
    *,
    clear_prefix: str | None = None,
    keep: Container[str] = (),
) -> None:
    """Set many system attributes of a study in one transaction. With ``clear_prefix``,
    every other attribute whose key starts with it, and is not in ``keep``, is emptied
    (``""``), as optuna-dashboard clears the chunks a shorter figure no longer fills; only
    those keys are read."""
    model = _models.StudySystemAttributeModel
    wanted: sqlalchemy.ColumnElement[bool] = model.key.in_(list(attrs))
    if clear_prefix is not None:
        wanted = sqlalchemy.or_(wanted, model.key.startswith(clear_prefix, autoescape=True))
    with _rdb_storage._create_scoped_session(storage.scoped_session, True) as session:
        rows = session.query(model).filter(model.study_id == study_id, wanted).all()
        existing: dict[str, Any] = {str(row.key): row for row in rows}
        for key, value in attrs.items():
            row = existing.pop(key, None)
            if row is None:
                session.add(model(study_id=study_id, key=key, value_json=json.dumps(value)))
            else:
                row.value_json = json.dumps(value)
        for key, row in existing.items():
            if clear_prefix is not None and key.startswith(clear_prefix) and key not in keep:
                row.value_json = json.dumps("")


# -- counting and finding trials in SQL ------------------------------------------------------


def trial_counts(
    storage: optuna.storages.RDBStorage, study_id: int, *, failed_with_attr: str
) -> tuple[dict[str, int], int]:
    """Trials of a study per state, and the failed ones that carry the user attribute
    ``failed_with_attr``: two counting queries instead of reading every trial."""
    by_state = sqlalchemy.text(
        "SELECT state, COUNT(*) FROM trials WHERE study_id = :s GROUP BY state"
    )
    failed = sqlalchemy.text(
        "SELECT COUNT(*) FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
        "WHERE t.study_id = :s AND t.state = 'FAIL' AND a.key = :k"
    )
    with storage.engine.connect() as conn:
        counts = {str(state): int(n) for state, n in conn.execute(by_state, {"s": study_id})}
        marked = int(conn.execute(failed, {"s": study_id, "k": failed_with_attr}).scalar() or 0)
    return counts, marked


def running_trials(
    storage: optuna.storages.RDBStorage, study_id: int
) -> dict[int, tuple[int, datetime.datetime | None]]:
    """Number and start of every running trial of the study, by trial id: one query."""
    query = sqlalchemy.text(
        "SELECT trial_id, number, datetime_start FROM trials "
        "WHERE study_id = :s AND state = 'RUNNING'"
    )
    with storage.engine.connect() as conn:
        rows = conn.execute(query, {"s": study_id}).all()
    return {int(i): (int(n), _as_datetime(start)) for i, n, start in rows}


def trial_place(
    storage: optuna.storages.RDBStorage, trial_id: int
) -> tuple[int, int, datetime.datetime | None]:
    """Study id, number and start of trial ``trial_id``: one query on its row (Optuna's
    ``get_trial`` reads its parameters and attributes too). KeyError for an unknown trial."""
    query = sqlalchemy.text(
        "SELECT study_id, number, datetime_start FROM trials WHERE trial_id = :t"
    )
    with storage.engine.connect() as conn:
        row = conn.execute(query, {"t": trial_id}).first()
    if row is None:
        raise KeyError(f"no trial with id {trial_id}")
    return int(row[0]), int(row[1]), _as_datetime(row[2])


def param_distributions(
    storage: optuna.storages.RDBStorage, study_id: int, names: Sequence[str]
) -> dict[str, BaseDistribution]:
    """The distribution of each of ``names`` that a trial of the study has used already (the
    one Optuna checks a new parameter against): one query."""
    if not names:
        return {}
    query = sqlalchemy.text(
        "SELECT p.param_name, MIN(p.distribution_json) FROM trial_params p "
        "JOIN trials t ON t.trial_id = p.trial_id "
        "WHERE t.study_id = :s AND p.param_name IN :names GROUP BY p.param_name"
    ).bindparams(sqlalchemy.bindparam("names", expanding=True))
    with storage.engine.connect() as conn:
        rows = conn.execute(query, {"s": study_id, "names": list(names)}).all()
    return {str(name): optuna.distributions.json_to_distribution(d) for name, d in rows}


def trial_system_attr(
    storage: optuna.storages.RDBStorage, trial_ids: list[int], key: str
) -> dict[int, Any]:
    """The system attribute ``key`` of those of ``trial_ids`` that have it: one query."""
    if not trial_ids:
        return {}
    query = sqlalchemy.text(
        "SELECT trial_id, value_json FROM trial_system_attributes "
        "WHERE key = :k AND trial_id IN :ids"
    ).bindparams(sqlalchemy.bindparam("ids", expanding=True))
    with storage.engine.connect() as conn:
        rows = conn.execute(query, {"k": key, "ids": trial_ids}).all()
    return {int(i): json.loads(value) for i, value in rows}


def budget_before(
    storage: optuna.storages.RDBStorage,
    study_id: int,
    number: int,
    *,
    failed_with_attr: str,
    uncounted_attr: str,
) -> int:
    """The trials numbered before ``number`` that use the budget (waiting, running, complete,
    pruned, or failed with the user attribute ``failed_with_attr``), leaving out those with
    the user attribute ``uncounted_attr``: one counting query."""
    query = sqlalchemy.text(
        "SELECT COUNT(*) FROM trials t WHERE t.study_id = :s AND t.number < :n "
        "AND NOT EXISTS (SELECT 1 FROM trial_user_attributes u "
        "WHERE u.trial_id = t.trial_id AND u.key = :u) "
        "AND (t.state IN ('COMPLETE', 'PRUNED', 'RUNNING', 'WAITING') OR (t.state = 'FAIL' "
        "AND EXISTS (SELECT 1 FROM trial_user_attributes f "
        "WHERE f.trial_id = t.trial_id AND f.key = :f)))"
    )
    values = {"s": study_id, "n": number, "u": uncounted_attr, "f": failed_with_attr}
    with storage.engine.connect() as conn:
        return int(conn.execute(query, values).scalar() or 0)


def waiting_trial_ids(storage: optuna.storages.RDBStorage, study_id: int) -> list[int]:
    """The ids of the study's waiting trials, by number: one query."""
    query = sqlalchemy.text(
        "SELECT trial_id FROM trials WHERE study_id = :s AND state = 'WAITING' ORDER BY number"
    )
    with storage.engine.connect() as conn:
        return [int(row[0]) for row in conn.execute(query, {"s": study_id})]


def trial_versions(
    storage: optuna.storages.RDBStorage, study_id: int, unfinished: Sequence[int], after: int
) -> dict[int, str]:
    """A version of each trial of the study whose id is above ``after`` or in ``unfinished``
    (one query): it changes when the trial's state, its parameters or intermediate values
    change, or a user or system attribute is added or a user attribute's value changes its
    length. A value rewritten in place at the same length (a running trial's heartbeat
    stamp) leaves it as it was."""
    query = sqlalchemy.text(
        "SELECT t.trial_id, t.state, "
        "(SELECT COUNT(*) FROM trial_params p WHERE p.trial_id = t.trial_id), "
        "(SELECT COUNT(*) FROM trial_intermediate_values i WHERE i.trial_id = t.trial_id), "
        "(SELECT COUNT(*) FROM trial_system_attributes a WHERE a.trial_id = t.trial_id), "
        "(SELECT COUNT(*) FROM trial_user_attributes u WHERE u.trial_id = t.trial_id), "
        "(SELECT COALESCE(SUM(LENGTH(u.value_json)), 0) FROM trial_user_attributes u "
        "WHERE u.trial_id = t.trial_id) "
        "FROM trials t WHERE t.study_id = :s AND (t.trial_id > :a OR t.trial_id IN :ids)"
    ).bindparams(sqlalchemy.bindparam("ids", expanding=True))
    with storage.engine.connect() as conn:
        rows = conn.execute(query, {"s": study_id, "a": after, "ids": list(unfinished) or [-1]})
        return {int(row[0]): ":".join(str(v) for v in row[1:]) for row in rows}


def _as_datetime(value: object) -> datetime.datetime | None:
    # SQLAlchemy's text() hands SQLite's timestamps over as strings.
    if value is None or isinstance(value, datetime.datetime):
        return value
    return datetime.datetime.fromisoformat(str(value))


def with_heartbeat(storage: optuna.storages.RDBStorage, trial_ids: list[int]) -> set[int]:
    """The trials of ``trial_ids`` that have recorded a heartbeat."""
    if not trial_ids:
        return set()
    query = sqlalchemy.text(
        "SELECT trial_id FROM trial_heartbeats WHERE trial_id IN :ids"
    ).bindparams(sqlalchemy.bindparam("ids", expanding=True))
    with storage.engine.connect() as conn:
        return {int(row[0]) for row in conn.execute(query, {"ids": trial_ids})}


def stale_trial_ids(storage: optuna.storages.RDBStorage, study_id: int) -> list[int]:
    """Running trials whose heartbeat has been silent for the storage's grace period."""
    return list(storage._get_stale_trial_ids(study_id))


# -- the Pareto front ------------------------------------------------------------------------


def pareto_front(
    trials: Sequence[FrozenTrial], directions: Sequence[optuna.study.StudyDirection]
) -> list[FrozenTrial]:
    """``study.best_trials``' rule (feasible trials only, where any has constraints) on the
    trials in hand."""
    constrained = _is_constrained_optimization(trials)
    return list(_get_pareto_front_trials_by_trials(trials, directions, constrained))


# -- optuna-dashboard's keys -----------------------------------------------------------------


def figure_attrs(figure_json: str, figure_id: str) -> tuple[dict[str, Any], str]:
    """The study system attributes that hold a figure for the dashboard, and their prefix
    (older, longer versions leave chunks under it to clear)."""
    from optuna_dashboard._custom_plot_data import SYSTEM_ATTR_PLOT_DATA, split_plot_data

    prefix = f"{SYSTEM_ATTR_PLOT_DATA}{figure_id}:"
    return dict(split_plot_data(figure_json, prefix)), prefix


def first_note_attrs(body: str, trial_id: int) -> dict[str, Any]:
    """The study system attributes of a trial's first note (version 1) for the dashboard."""
    from optuna_dashboard._note import note_ver_key, split_body

    attrs: dict[str, Any] = dict(split_body(body, trial_id))
    attrs[note_ver_key(trial_id)] = 1
    return attrs


# -- TPE on a window of the study ------------------------------------------------------------

#: Finished trials TPE learns from. Its good ("below") set is the best tenth or so of them,
#: which a window of a thousand keeps large enough to model.
HISTORY_WINDOW = 1000
_Split = tuple[list[FrozenTrial], list[FrozenTrial]]
_FINISHED = frozenset(s for s in TrialState if s.is_finished())
#: The system attribute of a trial's constraints (Optuna's list form).
CONSTRAINTS_KEY = _CONSTRAINTS_KEY


def recent(trials: Sequence[FrozenTrial], window: int) -> list[FrozenTrial]:
    """Of ``trials`` (by number), the latest ``window`` finished ones and every unfinished one
    before them, by number: what :class:`WindowedTPESampler` models."""
    seen = 0
    for index in range(len(trials) - 1, -1, -1):
        seen += trials[index].state in _FINISHED
        if seen == window:
            return [t for t in trials[:index] if t.state not in _FINISHED] + list(trials[index:])
    return list(trials)


class _RecentTrials:
    """``study`` as TPE sees it: the same, but ``_get_trials`` keeps only the latest finished
    trials (:func:`recent`) and reads through the study's cache (which re-reads unfinished
    trials at each ``ask``), or, behind a proxy that offers it, asks the proxy for those trials
    alone once per trial proposed (``recent_trials`` of the study's storage: Optuna's read
    sends every unfinished trial whole). What it derives from one read is kept until the next:
    within one ``ask`` the trials are the same for every parameter."""

    def __init__(self, study: optuna.Study, window: int) -> None:
        self._study, self._window = study, window
        self._source: list[FrozenTrial] | None = None  # the trials read, by number
        self._recent: list[FrozenTrial] = []
        self._by_states: dict[tuple[int, ...] | None, list[FrozenTrial]] = {}
        self._splits: dict[tuple[int, bool], _Split] = {}
        # per list of trials (kept alive here, so its id stays its own): each parameter's
        # values, in the trials' order
        self._columns: dict[int, tuple[list[FrozenTrial], dict[str, list[Any]]]] = {}
        self._remote = getattr(storage_of(study), "recent_trials", None)
        self._proposing: int | None = None  # the number of the trial proposed now
        self._read_for: tuple[int | None, list[FrozenTrial]] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def proposing(self, number: int) -> None:
        """Parameters of trial ``number`` are proposed next."""
        self._proposing = number

    def _read(self) -> list[FrozenTrial]:
        if self._remote is not None and self._proposing is not None:
            if self._read_for is not None and self._read_for[0] == self._proposing:
                return self._read_for[1]
            trials: list[FrozenTrial] | None = self._remote(study_id(self._study), self._window)
            if trials is not None:
                self._read_for = (self._proposing, trials)
                return trials
            self._remote = None  # the proxy offers no such call: Optuna's read
        return self._study._get_trials(deepcopy=False, use_cache=True)

    def _refresh(self) -> None:
        trials = self._read()
        if trials is self._source:
            return
        self._source, self._by_states, self._splits, self._columns = trials, {}, {}, {}
        self._recent = recent(trials, self._window)

    def _get_trials(
        self,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
        use_cache: bool = False,
    ) -> list[FrozenTrial]:
        self._refresh()
        key = None if states is None else tuple(s.value for s in TrialState if s in states)
        if key not in self._by_states:
            chosen = self._recent
            if states is not None:
                chosen = [t for t in chosen if t.state in states]
            self._by_states[key] = chosen
        trials = self._by_states[key]
        return copy.deepcopy(trials) if deepcopy else trials

    def split(self, sampler: WindowedTPESampler, trial: FrozenTrial) -> _Split:
        """TPE's good and bad trials for proposing ``trial``'s parameters (as
        ``TPESampler._sample`` makes them), made once for all of its parameters."""
        self._refresh()
        liar = sampler._constant_liar
        key = (trial.number, liar)
        if key not in self._splits:
            states = [TrialState.COMPLETE, TrialState.PRUNED]
            if liar:
                states.append(TrialState.RUNNING)
            trials = self._get_trials(deepcopy=False, states=states)
            if liar:
                trials = [t for t in trials if t.number != trial.number]
            n = sum(t.state != TrialState.RUNNING for t in trials)  # running ones are lies
            view: Any = self
            self._splits[key] = _tpe._split_trials(view, trials, sampler.gamma_of(self)(n))
        return self._splits[key]

    def values(self, trials: list[FrozenTrial], name: str) -> list[Any]:
        """``name``'s value in each trial of ``trials`` that has it, in order: one pass over
        ``trials`` serves every parameter."""
        cached = self._columns.get(id(trials))
        if cached is None or cached[0] is not trials:
            columns: dict[str, list[Any]] = {}
            for trial in trials:
                for key, value in trial.params.items():
                    columns.setdefault(key, []).append(value)
            cached = self._columns[id(trials)] = (trials, columns)
        return cached[1].get(name, [])


class WindowedTPESampler(optuna.samplers.TPESampler):
    """:class:`optuna.samplers.TPESampler` that models only the latest ``window`` finished
    trials (and every running one, for the constant liar), read through the study's cache:
    a suggestion costs the same in a study of 10,000 trials as in one of ``window``.
    Keyword-only arguments as TPESampler's.

    Its proposals are TPESampler's own for a study no larger than the window (same seed, same
    trials: ``test_within_the_window_the_proposals_are_tpes_own`` in
    ``tests/test_optuna_contract.py``); ``_sample`` is Optuna 5's, with the trials' split taken
    from the per-trial cache.
    """

    def __init__(self, *, window: int = HISTORY_WINDOW, **kwargs: Any) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        super().__init__(**kwargs)
        self._window = window
        self._view: _RecentTrials | None = None

    def _recent(self, study: optuna.Study | _RecentTrials) -> _RecentTrials:
        if isinstance(study, _RecentTrials):
            return study
        if self._view is None or self._view._study is not study:
            self._view = _RecentTrials(study, self._window)
        return self._view

    def gamma_of(self, study: Any) -> Any:
        """The size of the good set for ``n`` trials, as TPESampler chooses it."""
        if self._gamma is None:
            multi = len(study.directions) > 1
            self._gamma = _tpe.default_gamma_multiobjective if multi else _tpe.default_gamma
        return self._gamma

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        # The window also counts the startup trials (it never holds fewer than the study's
        # first ``window``), and the parameter's proposal reads it.
        view: Any = self._recent(study)
        view.proposing(trial.number)
        return super().sample_independent(view, trial, param_name, param_distribution)

    def _get_internal_repr(
        self, trials: list[FrozenTrial], search_space: dict[str, BaseDistribution], study: Any
    ) -> dict[str, np.ndarray]:
        # TPESampler's, for the one parameter an independent suggestion asks for, from the
        # values the view collected in one pass (a trial's params of a finished or running
        # trial: not multivariate, so no relative params stand in system attributes).
        if self._multivariate or len(search_space) != 1 or not isinstance(study, _RecentTrials):
            return super()._get_internal_repr(trials, search_space, study)
        ((name, dist),) = search_space.items()
        return {name: np.asarray([dist.to_internal_repr(v) for v in study.values(trials, name)])}

    def _sample(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        view = self._recent(study)
        below, above = view.split(self, trial)
        board: Any = view
        mpe_below = self._build_parzen_estimator(board, search_space, below, handle_below=True)
        mpe_above = self._build_parzen_estimator(board, search_space, above, handle_below=False)
        samples_below = mpe_below.sample(self._rng.rng, self._n_ei_candidates)
        acquisition = self._compute_acquisition_func(samples_below, mpe_below, mpe_above)
        proposal = optuna.samplers.TPESampler._compare(samples_below, acquisition)
        result: dict[str, Any] = {
            name: dist.to_external_repr(proposal[name]) for name, dist in search_space.items()
        }
        return result


# -- the proxy: its server and its cache ------------------------------------------------------


def proxy_server_with(
    storage: optuna.storages.BaseStorage,
    *,
    threads: int,
    interceptors: Sequence[Any],
    options: Sequence[tuple[str, Any]],
) -> Any:
    """Optuna's proxy service for ``storage`` on a ``grpc.Server`` of ``threads`` threads with
    ``interceptors`` and channel ``options``, no port yet (``run_grpc_proxy_server`` takes
    none of them)."""
    import grpc

    server = grpc.server(
        ThreadPoolExecutor(max_workers=threads), interceptors=interceptors, options=options
    )
    servicer = _grpc_servicer.OptunaStorageProxyService(storage)
    _api_pb2_grpc.add_StorageServiceServicer_to_server(servicer, server)
    return server


class GrpcClient(optuna.storages.GrpcStorageProxy):
    """Optuna's client of the proxy on the channel :meth:`channel` makes (Optuna's own client
    makes a plain insecure channel, with no way to add the shared secret to its calls)."""

    def channel(self) -> Any:
        """The channel to the proxy; a subclass adds its interceptors."""
        return _grpc_client.create_insecure_channel(self._host, self._port)

    def _setup(self) -> None:
        self._channel = self.channel()
        self._stub = _api_pb2_grpc.StorageServiceStub(self._channel)
        self._cache = _grpc_client.GrpcClientCache(self._stub)


#: Beyond any trial id.
_EVERY_ID = 2**62


class CoalescedCache(optuna.storages._CachedStorage):
    """Optuna's cache of an RDB storage whose reads of a study's unfinished trials are shared.

    Every ``get_all_trials`` re-reads the study's unfinished trials from the database, one
    request at a time. Here a request waits for the first read that starts after it arrived,
    and every request waiting when a read starts shares it: each still sees every write made
    before it asked, and the database is read once per round of waiting requests instead of
    once per request.

    A round reads whole only the unfinished trials whose version (:func:`trial_versions`, one
    query) changed since the cache read them, and every one of them at most
    :attr:`FULL_READ_SECONDS` apart: with hundreds of trials running, a claim's read of the
    study would otherwise read them all from the database each time, where a few changed.
    A value rewritten in place at the same length (a heartbeat stamp) is seen at the next
    full read."""

    FULL_READ_SECONDS = 5.0
    #: A study's user attributes (its config and budget, which every claim reads) are read
    #: from the database at most this often; a write through this cache is seen at once.
    ATTRS_SECONDS = 1.0

    def __init__(self, backend: optuna.storages.RDBStorage) -> None:
        super().__init__(backend)
        self._attrs_read: dict[int, tuple[float, dict[str, Any]]] = {}
        #: called with a study's id once it is deleted through this cache
        self.on_delete: list[Callable[[int], None]] = []
        self._round = threading.Condition()
        self._started: dict[int, int] = {}  # study id -> reads started
        self._done: dict[int, int] = {}  # study id -> the last read that finished
        self._reading: set[int] = set()
        self._versions: dict[int, str] = {}  # trial id -> version read (unfinished trials)
        self._full_at: dict[int, float] = {}  # study id -> when every unfinished trial was read

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        now = time.monotonic()
        hit = self._attrs_read.get(study_id)
        if hit is not None and now - hit[0] <= self.ATTRS_SECONDS:
            return dict(hit[1])
        attrs = super().get_study_user_attrs(study_id)
        self._attrs_read[study_id] = (now, attrs)
        return dict(attrs)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        super().set_study_user_attr(study_id, key, value)
        self.forget_study_attrs()

    def delete_study(self, study_id: int) -> None:
        super().delete_study(study_id)
        self.forget_study_attrs()
        for forget in self.on_delete:  # on SQLite the id may come back for another study
            forget(study_id)

    def forget_study_attrs(self) -> None:
        """Read the studies' user attributes afresh (one was written beside this cache)."""
        self._attrs_read.clear()

    def set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: BaseDistribution,
    ) -> None:
        # Optuna's cache looks the trial up in its own map, which a proxy restarted under a
        # running trial has not filled yet: KeyError, NOT_FOUND to the worker. The database
        # knows the trial: set it there (the database checks the distribution, too).
        # (Optuna's looks the trial up before it writes anything: a KeyError wrote nothing.)
        try:
            super().set_trial_param(trial_id, param_name, param_value_internal, distribution)
        except KeyError:
            self._backend.set_trial_param(trial_id, param_name, param_value_internal, distribution)

    def _read_changed(self, study_id: int) -> None:
        """Optuna's read into the cache (``_CachedStorage._read_trials_from_remote_storage``),
        of the trials that changed: the same bookkeeping, fewer trials read."""
        with self._lock:
            study = self._studies.setdefault(study_id, _cached_storage._StudyInfo())
            after = study.last_finished_trial_id
            now = time.monotonic()
            full = now - self._full_at.get(study_id, -math.inf) >= self.FULL_READ_SECONDS
            # versions first: a write between them and the read is read again next time
            versions = trial_versions(
                self._backend, study_id, sorted(study.unfinished_trial_ids), after
            )
            wanted = (
                set(versions)
                if full
                else {
                    tid for tid, version in versions.items() if self._versions.get(tid) != version
                }
            )
            # the study must exist (KeyError) even when nothing is wanted
            trials = self._backend._get_trials(study_id, None, wanted, _EVERY_ID)
            if full:
                self._full_at[study_id] = now
            self._add_trials_to_cache(study_id, trials)
            for trial in trials:
                tid = trial._trial_id
                if not trial.state.is_finished():
                    study.unfinished_trial_ids.add(tid)
                    self._versions[tid] = versions.get(tid, "")
                    continue
                study.last_finished_trial_id = max(study.last_finished_trial_id, tid)
                study.unfinished_trial_ids.discard(tid)
                self._versions.pop(tid, None)

    def _read_trials_from_remote_storage(self, study_id: int) -> None:
        with self._round:
            wanted = self._started.get(study_id, 0) + 1  # the first read after arriving
            while self._done.get(study_id, 0) < wanted:
                if study_id not in self._reading:
                    self._reading.add(study_id)
                    self._started[study_id] = number = self._started.get(study_id, 0) + 1
                    break
                self._round.wait()
            else:
                return
        read = False
        try:
            self._read_changed(study_id)
            read = True
        finally:
            with self._round:
                self._reading.discard(study_id)
                if read:  # reads run one at a time, so in order; a failed one is read again
                    self._done[study_id] = number
                self._round.notify_all()
