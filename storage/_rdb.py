"""Turn a URL into an Optuna RDB storage: SQLite embedded by default, PostgreSQL when shared."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sqlite3
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages._rdb import models as _rdb_models
from optuna.storages._rdb import storage as _rdb_storage
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from tauopt.errors import StorageError
from tauopt.storage._retry import root_message

#: Environment variable that names the storage when ``--storage`` is not given.
STORAGE_ENV = "TAUOPT_STORAGE"
#: Environment variable that names the artifact directory when ``--artifact-dir`` is not given.
ARTIFACTS_ENV = "TAUOPT_ARTIFACTS"
DEFAULT_DB = "tauopt.db"
_SQLITE_BUSY_SECONDS = 60
_PG_CONNECT_ARGS = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}
#: The longest study name Optuna's schema stores (``studies.study_name``).
MAX_STUDY_NAME = 512


def resolve_url(url: str | None = None) -> str:
    """``url``, else ``$TAUOPT_STORAGE``, else SQLite ``tauopt.db`` in the working directory."""
    chosen = url or os.environ.get(STORAGE_ENV)
    if chosen:
        return chosen
    return f"sqlite:///{(Path.cwd() / DEFAULT_DB).as_posix()}"


def redact(url: str) -> str:
    """The URL with any password masked, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sa_exc.ArgumentError:
        return url


def _sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    if not parsed.database or parsed.database == ":memory:":
        raise StorageError(f"{url!r}: use a SQLite file (sqlite:///path/tauopt.db), not memory")
    return Path(parsed.database)


def default_artifact_dir(url: str) -> Path:
    """``$TAUOPT_ARTIFACTS``, else ``tauopt-artifacts`` beside a SQLite file, else in the cwd."""
    env = os.environ.get(ARTIFACTS_ENV)
    if env:
        return Path(env)
    db = _sqlite_path(url)
    base = db.resolve().parent if db is not None else Path.cwd()
    return base / "tauopt-artifacts"


@dataclass(frozen=True, kw_only=True)
class StorageSettings:
    """Where trials live and how dead workers are detected.

    A running trial sends a heartbeat every ``heartbeat_interval`` seconds; one silent for
    ``grace_period`` seconds (default twice the interval) is marked failed and queued again.
    """

    url: str
    heartbeat_interval: int = 10
    grace_period: int | None = None
    max_retry: int = 3

    def __post_init__(self) -> None:
        if self.heartbeat_interval < 1:
            raise StorageError(
                f"heartbeat_interval must be >= 1 second, got {self.heartbeat_interval}"
            )
        if self.grace_period is not None and self.grace_period <= self.heartbeat_interval:
            raise StorageError(
                f"grace_period ({self.grace_period}s) must exceed heartbeat_interval "
                f"({self.heartbeat_interval}s), or a live worker's trial is failed"
            )
        if self.max_retry < 0:
            raise StorageError(f"max_retry must be >= 0, got {self.max_retry}")


def _prepare_sqlite(path: Path, *, create: bool) -> None:
    """WAL lets the dashboard read while workers write; the setting persists in the file.

    Only ``tauopt create`` makes the file: every other command finds it or says how to make it,
    and leaves no empty database behind.
    """
    if not create:
        if not path.is_file():
            raise StorageError(
                f"no SQLite database at {path}: create the study first with "
                f"`tauopt create --storage sqlite:///{path}`, or fix the path"
            )
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(
            f"cannot create the folder of the SQLite file {path}: {e.strerror or e}; "
            "choose a writable path"
        ) from e
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=_SQLITE_BUSY_SECONDS)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as e:
        raise StorageError(f"cannot open SQLite file {path}: {e}") from e


def _sqlite_settings(dbapi_connection: Any, connection_record: Any) -> None:
    """In WAL mode ``synchronous=NORMAL`` stays consistent after a crash of the process or the
    machine (a power cut can lose the last commits, never corrupt the file), and a commit no
    longer waits for the disk: workers make many small commits."""
    if isinstance(dbapi_connection, sqlite3.Connection):
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")


def open_storage(
    settings: StorageSettings, *, create_schema: bool = True
) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage for ``settings.url``, with heartbeats and stale-trial retries.

    ``create_schema=False`` is for workers: the schema is made once by ``tauopt create``, so
    several workers starting together do not race to create tables.
    """
    url = settings.url
    try:
        backend = make_url(url).get_backend_name()
    except sa_exc.ArgumentError as e:
        raise StorageError(
            f"{url!r} is not a database URL: use sqlite:///path.db or "
            "postgresql+psycopg2://user:password@host/db"
        ) from e
    engine_kwargs: dict[str, object] = {}
    db = _sqlite_path(url)
    if db is not None:
        _prepare_sqlite(db, create=create_schema)
        engine_kwargs["connect_args"] = {"timeout": _SQLITE_BUSY_SECONDS}

    elif backend == "postgresql":
        engine_kwargs["pool_pre_ping"] = True  # survive server restarts and idle cut-offs
        if make_url(url).get_driver_name() == "psycopg2":
            # A host that does not answer must not hang a command: give up connecting after
            # 10 s, and notice a dead server under an open connection within about a minute.
            engine_kwargs["connect_args"] = _PG_CONNECT_ARGS
    # Heartbeats and the retry callback are marked experimental; we rely on them knowingly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=settings.heartbeat_interval,
                grace_period=settings.grace_period,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=settings.max_retry
                ),
                skip_table_creation=not create_schema,
            )
        except (sa_exc.SQLAlchemyError, ImportError, ValueError, RuntimeError) as e:
            raise StorageError(f"cannot open storage {redact(url)}: {root_message(e)}") from e
        except optuna.exceptions.StorageInternalError as e:
            raise StorageError(f"cannot open storage {redact(url)}: {root_message(e)}") from e
    if db is not None:
        sqlalchemy.event.listen(storage.engine, "connect", _sqlite_settings)
        storage.engine.dispose()  # the connections opened so far predate the setting
    return storage


def set_trial_attrs(
    storage: optuna.storages.RDBStorage,
    trial_id: int,
    *,
    user: dict[str, Any] | None = None,
    system: dict[str, Any] | None = None,
) -> None:
    """Set many attributes of a running trial in one transaction (Optuna commits each
    ``set_user_attr`` alone: some twenty commits per finished trial)."""
    # Optuna's own per-attribute upsert, inside one session: the same rows, one commit.
    with _rdb_storage._create_scoped_session(storage.scoped_session, True) as session:
        for model, attrs in (
            (_rdb_models.TrialUserAttributeModel, user or {}),
            (_rdb_models.TrialSystemAttributeModel, system or {}),
        ):
            for key, value in attrs.items():
                storage._set_trial_attr_without_commit(session, model, trial_id, key, value)


def set_study_system_attrs(
    storage: optuna.storages.RDBStorage,
    study_id: int,
    attrs: dict[str, Any],
    *,
    clear_prefix: str | None = None,
) -> None:
    """Set many system attributes of a study in one transaction (Optuna commits each
    ``set_study_system_attr`` alone: a figure of a large study is a hundred chunks).

    With ``clear_prefix``, every other attribute whose key starts with it is emptied (``""``),
    as optuna-dashboard clears the chunks a shorter figure no longer fills; only those keys
    are read, not the study's other attributes (its notes grow with the study).
    """
    model = _rdb_models.StudySystemAttributeModel
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
            if clear_prefix is not None and key.startswith(clear_prefix):
                row.value_json = json.dumps("")


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


@contextlib.contextmanager
def study_lock(storage: optuna.storages.RDBStorage, study_name: str) -> Iterator[None]:
    """A lock every worker of one study shares, to claim trials against the budget atomically.

    PostgreSQL: a transaction-scoped advisory lock. SQLite (one machine): ``flock`` on a file
    beside the database.
    """
    engine: sqlalchemy.engine.Engine = storage.engine
    key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
    if engine.dialect.name == "postgresql":
        conn = None
        try:
            conn = engine.connect()
            transaction = conn.begin()
            conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
        except sa_exc.SQLAlchemyError as e:
            if conn is not None:
                with contextlib.suppress(sa_exc.SQLAlchemyError):
                    conn.close()
            raise StorageError(f"cannot lock study {study_name!r}: {root_message(e)}") from e
        try:
            yield
        finally:
            # Committing releases the lock. If the connection died meanwhile, the server has
            # released it already; the work done under it stands and must not be redone.
            with contextlib.suppress(sa_exc.SQLAlchemyError):
                transaction.commit()
            with contextlib.suppress(sa_exc.SQLAlchemyError):
                conn.close()
        return
    db = _sqlite_path(str(engine.url))
    lock_path = Path(f"{db}.{key & 0xFFFFFFFF:08x}.lock") if db else Path(f".tauopt-{key}.lock")
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
