"""Turn a URL into an Optuna RDB storage: SQLite embedded by default, PostgreSQL when shared."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sqlite3
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import optuna
import sqlalchemy
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from tauopt.errors import ConfigError, StorageError
from tauopt.storage._proxy import is_proxy_url, open_proxy
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
#: The fewest connections a bounded pool may have: the proxy's budget check holds the study's
#: lock on one connection while it counts on another.
MIN_POOL = 2
#: Seconds a call waits for a free connection of a bounded pool.
POOL_WAIT_SECONDS = 30.0


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
    if is_proxy_url(url):
        return None
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    if not parsed.database or parsed.database == ":memory:":
        raise ConfigError(f"{url!r}: use a SQLite file (sqlite:///path/tauopt.db), not memory")
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
    #: At most this many database connections (None: SQLAlchemy's 5, and 10 more at peaks).
    pool_size: int | None = None

    def __post_init__(self) -> None:
        if self.pool_size is not None and (
            isinstance(self.pool_size, bool)
            or not isinstance(self.pool_size, int)
            or self.pool_size < MIN_POOL
        ):
            raise ConfigError(
                f"the database connections must be a whole number >= {MIN_POOL}, got "
                f"{self.pool_size!r}"
            )
        if (
            isinstance(self.heartbeat_interval, bool)
            or not isinstance(self.heartbeat_interval, int)
            or self.heartbeat_interval < 1
        ):
            raise ConfigError(
                f"heartbeat_interval must be a whole number of seconds >= 1, got "
                f"{self.heartbeat_interval!r}"
            )
        if self.grace_period is not None and self.grace_period <= self.heartbeat_interval:
            raise ConfigError(
                f"grace_period ({self.grace_period}s) must exceed heartbeat_interval "
                f"({self.heartbeat_interval}s), or a live worker's trial is failed"
            )
        if self.max_retry < 0:
            raise ConfigError(f"max_retry must be >= 0, got {self.max_retry}")


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


def _connect_args(url: str) -> dict[str, Any]:
    if make_url(url).get_driver_name() == "psycopg2":
        # A host that does not answer must not hang a command: give up connecting after
        # 10 s, and notice a dead server under an open connection within about a minute.
        return dict(_PG_CONNECT_ARGS)
    return {}


def normalize_url(url: str) -> str:
    """``url`` with PostgreSQL's driver named: SQLAlchemy 2.1 takes a plain ``postgresql://``
    for psycopg 3, which tauopt does not install; psycopg2 is its driver."""
    if is_proxy_url(url):
        return url
    try:
        parsed = make_url(url)
    except sa_exc.ArgumentError as e:
        raise ConfigError(
            f"{url!r} is not a database URL: use sqlite:///path.db or "
            "postgresql://user:password@host/db, or a proxy's grpc://host:port"
        ) from e
    if parsed.drivername == "postgresql":
        return parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    return url


def open_storage(
    settings: StorageSettings, *, create_schema: bool = True
) -> optuna.storages.BaseStorage:
    """An Optuna RDB storage for ``settings.url``, with heartbeats and stale-trial retries, or
    the client of a proxy for a ``grpc://HOST:PORT`` URL.

    ``create_schema=False`` is for workers and readers: they never create tables, and one
    that finds them being made waits for their creator (:func:`_schema_stamped`). With
    ``create_schema=True`` the tables are made under a lock of the whole database, so that any
    number of processes may create studies on a fresh database at the same moment.
    """
    if is_proxy_url(settings.url):
        return open_proxy(settings.url)
    url = normalize_url(settings.url)
    engine_kwargs: dict[str, object] = {}
    db = _sqlite_path(url)
    if db is not None:
        engine_kwargs["connect_args"] = {"timeout": _SQLITE_BUSY_SECONDS}
    elif make_url(url).get_backend_name() == "postgresql":
        engine_kwargs["pool_pre_ping"] = True  # survive server restarts and idle cut-offs
        engine_kwargs["connect_args"] = _connect_args(url)
    if settings.pool_size is not None:
        # A bound, not a peak: a call that finds every connection busy waits for one
        # (POOL_WAIT_SECONDS, then a transient error the caller retries).
        engine_kwargs.update(
            pool_size=settings.pool_size, max_overflow=0, pool_timeout=POOL_WAIT_SECONDS
        )
    if not create_schema:
        if db is not None:
            _prepare_sqlite(db, create=False)
        if _schema_stamped(url, engine_kwargs):
            storage = _rdb(url, settings, engine_kwargs, create_schema=False)
        else:  # tables being made, or none: Optuna's open would write the version rows
            with _schema_lock(url):
                storage = _rdb(url, settings, engine_kwargs, create_schema=False)
    else:
        with _schema_lock(url):
            if db is not None:
                _prepare_sqlite(db, create=True)
            storage = _rdb(url, settings, engine_kwargs, create_schema=True)
    if db is not None:
        sqlalchemy.event.listen(storage.engine, "connect", _sqlite_settings)
        storage.engine.dispose()  # the connections opened so far predate the setting
    return storage


def _rdb(
    url: str, settings: StorageSettings, engine_kwargs: dict[str, object], *, create_schema: bool
) -> optuna.storages.RDBStorage:
    # Heartbeats and the retry callback are marked experimental; we rely on them knowingly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=settings.heartbeat_interval,
                grace_period=settings.grace_period,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=settings.max_retry
                ),
                skip_table_creation=not create_schema,
            )
        except (
            sa_exc.SQLAlchemyError,
            ImportError,
            ValueError,
            RuntimeError,
            optuna.exceptions.StorageInternalError,
        ) as e:
            raise StorageError(f"cannot open storage {redact(url)}: {root_message(e)}") from e


def _schema_stamped(url: str, engine_kwargs: dict[str, object]) -> bool:
    """Whether the tables are all made: Optuna's open writes the version rows where they are
    missing, even with ``skip_table_creation``, and stamps the schema's revision last. A reader
    that opened beside a creator making the tables wrote those rows too, and one of the two
    failed on "UNIQUE constraint failed: alembic_version.version_num"."""
    engine = sqlalchemy.create_engine(
        url,
        connect_args=engine_kwargs.get("connect_args", {}),
        poolclass=sqlalchemy.pool.NullPool,
    )
    try:
        with engine.connect() as conn:
            stamped = conn.execute(sqlalchemy.text("SELECT COUNT(*) FROM alembic_version"))
            return bool(stamped.scalar())
    except sa_exc.SQLAlchemyError:
        return False  # no such table, or the database away: the locked open will tell
    finally:
        engine.dispose()


def _stderr(line: str) -> None:
    print(f"tauopt: {line}", file=sys.stderr, flush=True)


def _lock_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


#: Seconds a holder of a study's claim lock on PostgreSQL may go without a statement on the
#: lock's connection before the server ends that session and so frees the lock: a worker
#: stopped (SIGSTOP, a hung host) inside a claim would otherwise stall every other worker's
#: claims for as long as its connection lives. A claim holds the lock about a second.
LOCK_IDLE_SECONDS = 60.0


@contextlib.contextmanager
def study_lock(
    storage: optuna.storages.RDBStorage,
    study_name: str,
    *,
    idle_seconds: float = LOCK_IDLE_SECONDS,
    log: Callable[[str], None] = _stderr,
) -> Iterator[None]:
    """A lock every worker of one study shares, to claim trials against the budget atomically.

    PostgreSQL: a transaction-scoped advisory lock, freed by the server when its holder goes
    ``idle_seconds`` without a statement on it. SQLite (one machine): ``flock`` on a file
    beside the database, there only while held (:func:`_file_lock`), taken over from a holder
    that keeps it ``idle_seconds``, with a line to ``log``.
    """
    engine: sqlalchemy.engine.Engine = storage.engine
    key = _lock_key(study_name)
    if engine.dialect.name == "postgresql":
        with _advisory_lock(engine, key, f"cannot lock study {study_name!r}", idle_seconds):
            yield
        return
    what = f"the claim lock of study {study_name!r}"
    with _file_lock(str(engine.url), f"study-{key & 0xFFFFFFFF:08x}", what, idle_seconds, log):
        yield


@contextlib.contextmanager
def _advisory_lock(
    engine: sqlalchemy.engine.Engine, key: int, what: str, idle_seconds: float | None = None
) -> Iterator[None]:
    conn = None
    try:
        conn = engine.connect()
        transaction = conn.begin()
        if idle_seconds is not None:
            # LOCAL: for this transaction only; the pooled connection keeps its settings.
            conn.execute(
                sqlalchemy.text(
                    "SELECT set_config('idle_in_transaction_session_timeout', :t, true)"
                ),
                {"t": f"{max(1, round(idle_seconds * 1000))}ms"},
            )
        conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})
    except sa_exc.SQLAlchemyError as e:
        if conn is not None:
            with contextlib.suppress(sa_exc.SQLAlchemyError):
                conn.close()
        raise StorageError(f"{what}: {root_message(e)}") from e
    try:
        yield
    finally:
        # Committing releases the lock. If the connection died meanwhile, the server has
        # released it already; the work done under it stands and must not be redone.
        with contextlib.suppress(sa_exc.SQLAlchemyError):
            transaction.commit()
        with contextlib.suppress(sa_exc.SQLAlchemyError):
            conn.close()


def _lock_path(url: str, what: str) -> Path:
    """The lock file of ``what`` for the SQLite database of ``url``: beside it, hidden, so that
    every process that opens the database finds the same file whatever its temporary folder
    (a lock file in each process's own folder locks nothing)."""
    db = _sqlite_path(url)
    if db is None:
        raise ConfigError(f"{url!r}: a file lock is for SQLite databases")
    db = db.resolve()
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(
            f"cannot create the folder of the SQLite file {db}: {e.strerror or e}; "
            "choose a writable path"
        ) from e
    return db.with_name(f".{db.name}.{what}.lock")


def _same_file(path: Path, fh: IO[str]) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
    except FileNotFoundError:
        return False


def _holder(path: Path) -> str:
    """Who holds the lock at ``path``, as its holder wrote it, and whether that process is
    stopped."""
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return "a process"
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return f"process {pid}"
    return f"process {pid} ({'stopped' if state in ('T', 't') else 'not stopped'})"


@contextlib.contextmanager
def _file_lock(
    url: str,
    what: str,
    name: str | None = None,
    idle_seconds: float | None = None,
    log: Callable[[str], None] = _stderr,
) -> Iterator[None]:
    """``flock`` on a hidden file beside the SQLite database of ``url``, one per ``what``.

    The file is there only while the lock is held: its holder removes it on release, and a
    process that locked a file no longer at the path (removed, or replaced) tries again.
    With ``idle_seconds``, a waiter that has waited that long on one holder (stopped, or
    hung) takes the lock over: it puts a locked file of its own in the holder's place (under
    a lock of the folder, so that one waiter does) and says so. The holder, resumed, finds
    the path no longer its file and leaves it alone; claims check their place in the budget
    in the database, so two holders for a moment cannot overshoot it.
    """
    path = _lock_path(url, what)
    waited_on: tuple[tuple[int, int], float] | None = None  # (the held file, since when)
    pause = 0.002
    while True:
        fh: IO[str] = open(path, "a+")  # noqa: SIM115 (kept open past this loop while it holds the lock)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # a file is its inode and its change time: a new holder's file may reuse the
            # inode of one removed, never its time (its holder writes into it at once)
            st, now = os.fstat(fh.fileno()), time.monotonic()
            held = (st.st_ino, st.st_ctime_ns)
            if waited_on is None or waited_on[0] != held:
                waited_on = (held, now)
            elif idle_seconds is not None and now - waited_on[1] >= idle_seconds:
                taken = _take_over(path, fh)
                if taken is not None:
                    log(
                        f"{name or what} was held for {now - waited_on[1]:.0f} s by "
                        f"{taken[1]}; taken over"
                    )
                    fh.close()
                    fh = taken[0]
                    break
                waited_on = None
            fh.close()
            time.sleep(pause)
            pause = min(pause * 2, 0.1)
            continue
        if _same_file(path, fh):
            break
        fh.close()  # removed or replaced while this process waited: lock the new one
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        with _folder_locked(path):  # not while a waiter puts its own file in this one's place
            if _same_file(path, fh):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


@contextlib.contextmanager
def _folder_locked(path: Path) -> Iterator[None]:
    """``flock`` on the folder of ``path``: a takeover and a release, one at a time. Held for
    a few system calls, so no process stopped inside it holds it for long."""
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        yield
    finally:
        os.close(folder)


def _take_over(path: Path, fh: IO[str]) -> tuple[IO[str], str] | None:
    """A locked file of this process in place of the held file at ``path`` (which ``fh`` has
    open), and who held it; None if it changed meanwhile (another waiter took it over, or the
    holder let it go)."""
    with _folder_locked(path):
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            fcntl.flock(fh, fcntl.LOCK_UN)
            return None  # let go meanwhile: no takeover
        if not _same_file(path, fh):
            return None
        who = _holder(path)
        fresh = path.with_name(f"{path.name}.{os.getpid()}.new")
        new = open(fresh, "a+")  # noqa: SIM115 (returned, locked, to the caller)
        fcntl.flock(new, fcntl.LOCK_EX)
        os.replace(fresh, path)
        return new, who


@contextlib.contextmanager
def _schema_lock(url: str) -> Iterator[None]:
    """Held while the tables are made: processes that create a study on a fresh database at
    the same moment make them once (else "table studies already exists")."""
    if make_url(url).get_backend_name() != "postgresql":
        with _file_lock(url, "schema", "the schema lock"):
            yield
        return
    engine = sqlalchemy.create_engine(
        url, connect_args=_connect_args(url), poolclass=sqlalchemy.pool.NullPool
    )
    try:
        with _advisory_lock(engine, _lock_key("tauopt schema"), "cannot lock the database"):
            yield
    finally:
        engine.dispose()
