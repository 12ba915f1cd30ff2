"""The database is a remote service: any call can fail. Tell transient failures (a dropped
connection, a restarting server, a busy SQLite file) from lasting ones (no such database, a wrong
password), retry the transient ones with bounded backoff, and say plainly what went wrong."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import optuna
from sqlalchemy import exc as sa_exc

from tauopt.errors import StorageError

T = TypeVar("T")

#: Server messages of failures that waiting does not cure.
_LASTING = (
    "does not exist",
    "authentication failed",
    "no password supplied",
    "permission denied",
    "no pg_hba.conf entry",
    "could not translate host name",
    "unable to open database file",
    "file is not a database",
    "value too long",
    "no such table",
)
#: Passing failures whose messages also match _LASTING, so checked before it: "could not
#: translate host name ...: Temporary failure in name resolution" is the resolver's EAI_AGAIN,
#: a name a container network registers a moment after the container starts (a name that does
#: not exist, "Name or service not known", stays lasting).
_PASSING_FIRST = ("temporary failure in name resolution",)
#: Messages of failures that a retry can cure.
_PASSING = (
    "could not connect",
    "connection refused",
    "server closed the connection",
    "terminating connection",
    "connection already closed",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "ssl connection has been closed",
    "database is locked",
    "timeout",
    "timed out",
    "connection reset",
    "broken pipe",
)


def _chain(error: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in out:
        out.append(current)
        current = current.__cause__ or current.__context__
    return out


def root_message(error: BaseException) -> str:
    """The first line of the innermost database error (Optuna's own wrapper says only
    "e.g. exceeding max length", whatever happened)."""
    for cause in reversed(_chain(error)):
        if _grpc_code(cause) is not None:
            details = getattr(cause, "details", None)
            return f"proxy: {_grpc_code(cause)}: {details() if callable(details) else cause}"
        if not cause.args:
            # a bare marker (SQLAlchemy's InvalidatePoolError prints "()") names no cause
            continue
        text = str(getattr(cause, "orig", None) or cause).strip()
        if text and isinstance(cause, (sa_exc.SQLAlchemyError, sqlite3.Error, OSError)):
            return text.splitlines()[0]
        if text and type(cause).__module__.startswith("psycopg2"):
            return text.splitlines()[0]
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


#: gRPC status codes of a proxy that is away or busy (a restart): worth waiting for.
_GRPC_PASSING = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED"}


def _grpc_code(error: BaseException) -> str | None:
    """The status code's name of a gRPC error (the proxy's), else None."""
    code = getattr(error, "code", None)
    if type(error).__module__.split(".")[0] != "grpc" or not callable(code):
        return None
    return str(getattr(code(), "name", code()))


def is_storage_error(error: BaseException) -> bool:
    """Whether ``error`` came from the database or the proxy (as opposed to the code that
    called it)."""
    return any(
        isinstance(
            c, (sa_exc.SQLAlchemyError, sqlite3.Error, optuna.exceptions.StorageInternalError)
        )
        or _grpc_code(c) is not None
        for c in _chain(error)
    )


def is_transient(error: BaseException) -> bool:
    """A database failure that waiting may cure (the connection, not the request, failed)."""
    if not is_storage_error(error):
        return False
    codes = {_grpc_code(c) for c in _chain(error)} - {None}
    if codes:
        return bool(codes & _GRPC_PASSING)
    message = root_message(error).lower()
    if any(text in message for text in _PASSING_FIRST):
        return True
    if any(text in message for text in _LASTING):
        return False
    for cause in _chain(error):
        if isinstance(cause, sa_exc.DBAPIError) and cause.connection_invalidated:
            return True
        if isinstance(cause, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)):
            return True
    return any(text in message for text in _PASSING)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How long a worker rides out transient storage failures before it gives up.

    Waits start at ``first_wait`` seconds and double up to ``max_wait``; after ``limit``
    seconds of failures in a row the call raises :class:`StorageError`. The default limit is
    long enough for a PostgreSQL restart.
    """

    limit: float = 300.0
    first_wait: float = 0.5
    max_wait: float = 10.0

    def __post_init__(self) -> None:
        if not (self.limit >= 0 and self.first_wait > 0 and self.max_wait >= self.first_wait):
            raise StorageError(
                f"retry limit must be >= 0 s and waits positive, got limit={self.limit}, "
                f"first_wait={self.first_wait}, max_wait={self.max_wait}"
            )

    def call(
        self, what: str, fn: Callable[[], T], log: Callable[[str], None], *, first: bool = False
    ) -> T:
        """``fn()``, retried while it fails transiently and the limit allows. ``first``: the
        first contact with the database, where "connection refused" means nothing listens
        there (a wrong address, a server not started), not a restart: it is not waited for."""
        deadline = time.monotonic() + self.limit
        wait = self.first_wait
        failures = 0
        while True:
            try:
                result = fn()
            except Exception as e:
                if first and is_storage_error(e) and _refused(e):
                    raise StorageError(
                        f"nothing answers at the database's address ({root_message(e)}): "
                        "start the database, or check the host and port in --storage"
                    ) from e
                if not is_transient(e):
                    raise
                failures += 1
                if time.monotonic() + wait > deadline:
                    raise StorageError(
                        f"the database failed for {self.limit:g} s while {what} "
                        f"({root_message(e)}); giving up (raise --storage-retry-seconds to "
                        "wait longer)"
                    ) from e
                log(f"storage error while {what} ({root_message(e)}); retrying in {wait:.1f} s")
                time.sleep(wait)
                wait = min(wait * 2, self.max_wait)
                continue
            if failures:
                log(f"storage answers again ({what} succeeded after {failures} retries)")
            return result


def _refused(error: BaseException) -> bool:
    if any(_grpc_code(c) is not None for c in _chain(error)):
        return False  # the proxy answered: its database may be restarting
    message = root_message(error).lower()
    return "connection refused" in message or "could not connect to server" in message
