"""Optuna's gRPC storage proxy: ``tauopt proxy`` serves a database to any number of workers,
which need only its address (``--storage grpc://HOST:PORT``), no database credentials. The
proxy holds the database connections (at most ``--db-connections``) and Optuna's cache of the
studies; beside Optuna's service it serves tauopt's batched attribute calls
(:mod:`tauopt.storage._service`).

Every call passes the proxy's guard (:class:`_Guard`):

* With a shared secret (``$TAUOPT_PROXY_SECRET`` on the proxy), a call that does not present
  it is refused (UNAUTHENTICATED) before it reaches the database. Without one, anyone who
  reaches the port can read, change and delete every study.
* A database failure is answered UNAVAILABLE when waiting may cure it (the server down,
  restarting, out of connections), which a worker rides out as it does on a direct database,
  and INTERNAL when it will not (no such database); both are logged. Optuna's own service
  would answer UNKNOWN for either, and say nothing.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import ipaddress
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Container, Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import grpc
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from tauopt.errors import ConfigError, StorageError
from tauopt.storage import _optuna as private
from tauopt.storage._callstats import CallStats, log_every
from tauopt.storage._retry import is_storage_error, is_transient, root_message
from tauopt.storage._service import SECRET_KEY, ServiceClient, TauoptService, proxy_channel

SCHEME = "grpc://"
#: The environment variable that holds the proxy's shared secret, on the proxy and its clients.
SECRET_ENV = "TAUOPT_PROXY_SECRET"
MIN_SECRET_CHARS = 16
#: The database connections a proxy holds at most, unless told otherwise.
DEFAULT_CONNECTIONS = 8
_WAITING = TrialState.WAITING
#: Seconds a command waits for the proxy to answer at first contact.
_READY_SECONDS = 10.0
#: The same failure is logged at most once in this many seconds (with a count of the rest).
_LOG_EVERY = 5.0


def is_proxy_url(url: str) -> bool:
    return url.startswith(SCHEME)


def address(url: str) -> tuple[str, int]:
    """``grpc://HOST:PORT`` as (host, port); an IPv6 host keeps its brackets (``[::1]``), as
    gRPC's ``host:port`` targets need them."""
    wrong = f"{url!r} is not a proxy address: use grpc://HOST:PORT (an IPv6 host in brackets)"
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError as e:  # "Invalid IPv6 URL", a port out of range or not a number
        raise ConfigError(wrong) from e
    if not host or port is None or parts.path not in ("", "/"):
        raise ConfigError(wrong)
    return (f"[{host}]" if ":" in host else host), port


def proxy_secret() -> str | None:
    """The shared secret of ``$TAUOPT_PROXY_SECRET``, or None where it is not set."""
    secret = os.environ.get(SECRET_ENV, "").strip()
    if not secret:
        return None
    if len(secret) < MIN_SECRET_CHARS or not secret.isprintable():
        raise ConfigError(
            f"${SECRET_ENV} must be at least {MIN_SECRET_CHARS} printable characters, got "
            f"{len(secret)}: make one with `python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'`"
        )
    return secret


class ProxyClient(private.GrpcClient):
    """Optuna's client of the proxy, with tauopt's service as :attr:`service`; every call
    presents ``secret``."""

    def __init__(self, *, host: str, port: int, secret: str | None = None) -> None:
        self.address = (host, port)
        self.secret = secret
        super().__init__(host=host, port=port)
        self.service = ServiceClient(self, host, port, secret)
        # trial id -> parameters set and not yet sent (see params_together)
        self._unsent: dict[int, list[tuple[str, float, BaseDistribution]]] = {}
        # trial id -> a trial just made by new_trial, for the first read of it
        self._made: dict[int, FrozenTrial] = {}

    def channel(self) -> Any:
        host, port = self.address
        return proxy_channel(f"{host}:{port}", self.secret)

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state.pop("service", None)  # a channel: made anew on the other side
        state["_unsent"], state["_made"] = {}, {}
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self.service = ServiceClient(self, *self.address, self.secret)

    @contextlib.contextmanager
    def params_together(self, trial_id: int) -> Iterator[None]:
        """The parameters of ``trial_id`` set within are sent in one call as it ends (one
        transaction), where Optuna's client makes a call for each; ``optuna.Trial`` keeps
        its own copy, and nothing reads them from the storage meanwhile. What a failed send
        left is sent by the next ``params_together`` of the trial (a retry of the drawing:
        Optuna draws a parameter once, and the retry sets none)."""
        self._unsent.setdefault(trial_id, [])
        done = False
        try:
            yield
            done = True
        finally:
            unsent = self._unsent.pop(trial_id, [])
            try:
                if unsent:
                    self.service.set_trial_params(trial_id, unsent)
            except ValueError:  # refused for good: a distribution unlike the study's
                if done:
                    raise
            except Exception:
                self._unsent[trial_id] = unsent  # kept for the retry
                if done:
                    raise

    def set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: BaseDistribution,
    ) -> None:
        unsent = self._unsent.get(trial_id)
        if unsent is None:
            super().set_trial_param(trial_id, param_name, param_value_internal, distribution)
        else:
            unsent.append((param_name, param_value_internal, distribution))

    def close(self) -> None:
        self.service.close()
        super().close()

    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        # ask() first looks for a waiting trial: through Optuna's service that reads every
        # unfinished trial of the study, whole; the proxy's SQL names the few waiting ones.
        if isinstance(states, (tuple, list, set, frozenset)) and set(states) == {_WAITING}:
            ids = self.service.waiting_trial_ids(study_id)
            if ids is not None:
                return [self.get_trial(tid) for tid in ids]
        return super().get_all_trials(study_id, deepcopy=deepcopy, states=states)

    def new_trial(
        self, study: optuna.Study, *, failed_with_attr: str, budget_at: Sequence[str]
    ) -> tuple[optuna.Trial | None] | None:
        """A new trial of ``study`` made, given its first heartbeat and checked against the
        budget by the proxy in one call: (the trial,), or (None,) past the budget (the
        proxy failed it); None where the proxy offers no such call. ``optuna.Trial`` reads
        the trial as it is made: the proxy's answer serves that read."""
        made = self.service.new_trial(
            private.study_id(study), failed_with_attr=failed_with_attr, budget_at=budget_at
        )
        if made is None:
            return None
        if made.state != TrialState.RUNNING:
            return (None,)
        self._made[private.trial_id(made)] = made
        try:
            return (private.trial_of(study, private.trial_id(made)),)
        finally:
            self._made.pop(private.trial_id(made), None)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        made = self._made.pop(trial_id, None)
        return made if made is not None else super().get_trial(trial_id)

    def recent_trials(self, study_id: int, window: int) -> list[FrozenTrial] | None:
        """What :class:`~tauopt.storage.WindowedTPESampler` reads, in one call of tauopt's
        service; None where the proxy offers none (the sampler reads through Optuna's)."""
        return self.service.recent_trials(study_id, window)


def open_proxy(url: str) -> ProxyClient:
    """A client of the proxy at ``url``, once it answers and takes this client's secret."""
    host, port = address(url)
    secret = proxy_secret()
    with warnings.catch_warnings():  # experimental since Optuna 4.2; relied on knowingly
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        proxy = ProxyClient(host=host, port=port, secret=secret)
    try:
        # Optuna raises ConnectionError for a timeout (TimeoutError in older releases)
        proxy.wait_server_ready(timeout=_READY_SECONDS)
    except (TimeoutError, ConnectionError) as e:
        proxy.close()
        raise StorageError(
            f"nothing answers at {url} within {_READY_SECONDS:g} s: start the proxy (tauopt "
            "proxy) or check the address in --storage"
        ) from e
    try:
        # any answer will do (most likely: no such study): the proxy took the call
        proxy.get_study_id_from_name("tauopt: does this proxy take my calls?")
    except KeyError:
        pass
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAUTHENTICATED:
            raise  # the database behind it may be away: the caller's retry decides
        proxy.close()
        raise StorageError(
            f"the proxy at {url} refused this client: set ${SECRET_ENV} to the proxy's secret"
            + (" (the one set here differs)" if secret else " (none is set here)")
        ) from e
    return proxy


class _FailureLog:
    """The proxy's log of database failures: the first of a kind at once, the same again at
    most every :data:`_LOG_EVERY` seconds with a count, and a line when the database answers
    again."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self._lock = threading.Lock()
        self._last: tuple[str, float] | None = None
        self._unsaid = 0
        self._failing = 0

    def failed(self, method: str, error: BaseException, answer: str) -> None:
        cause = root_message(error)
        with self._lock:
            self._failing += 1
            now = time.monotonic()
            if (
                self._last is not None
                and self._last[0] == cause
                and now - self._last[1] < _LOG_EVERY
            ):
                self._unsaid += 1
                return
            more = (
                f" ({self._unsaid} more failed calls since the last line)" if self._unsaid else ""
            )
            self._last, self._unsaid = (cause, now), 0
        self.log(f"database error in {method} ({cause}): answered {answer}{more}")

    def answered(self) -> None:
        if not self._failing:  # the common case, without the lock
            return
        with self._lock:
            failing, self._failing, self._last, self._unsaid = self._failing, 0, None, 0
        if failing:
            self.log(f"the database answers again (after {failing} failed calls)")


class _Guard(grpc.ServerInterceptor):  # type: ignore[misc]
    """Every call of the proxy: refused without the shared secret; a database failure
    answered with a status a worker understands, and logged; its cost counted in ``stats``."""

    def __init__(
        self, secret: str | None, log: Callable[[str], None], stats: CallStats | None = None
    ) -> None:
        self.secret = secret.encode() if secret is not None else None
        self.log = log
        self.stats = stats if stats is not None else CallStats()
        self.failures = _FailureLog(log)
        self._refused: dict[str, float] = {}

    def _presented(self, metadata: Any) -> bool:
        if self.secret is None:
            return True
        given = [v for k, v in metadata or () if k == SECRET_KEY]
        value = given[0].encode() if given and isinstance(given[0], str) else b""
        return hmac.compare_digest(value, self.secret)

    def _refuse(self, context: grpc.ServicerContext) -> None:
        peer = context.peer().rsplit(":", 1)[0]
        now = time.monotonic()
        if now - self._refused.get(peer, -1e9) > 60:  # once a minute per address
            self._refused[peer] = now
            self.log(f"refused calls from {peer}: no shared secret, or a wrong one")
        context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            f"this proxy takes only calls with its shared secret: set ${SECRET_ENV} to it",
        )

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler  # every call of both services is unary
        allowed = self._presented(details.invocation_metadata)
        method = details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            if not allowed:
                self._refuse(context)
            cpu, wall = time.thread_time(), time.perf_counter()
            try:
                reply = inner(request, context)
            except Exception as e:
                # the service's own answer (ALREADY_EXISTS for a duplicate study, whose cause
                # is the database's error, NOT_FOUND, ...) stands; any other error than the
                # database's is a bug, answered UNKNOWN
                if _answered(context) or not is_storage_error(e):
                    raise
                transient = is_transient(e)
                answer = "UNAVAILABLE (a worker retries)" if transient else "INTERNAL"
                self.failures.failed(method, e, answer)
                code = grpc.StatusCode.UNAVAILABLE if transient else grpc.StatusCode.INTERNAL
                context.abort(code, f"the database behind the proxy: {root_message(e)}")
            finally:
                self.stats.add(method, time.thread_time() - cpu, time.perf_counter() - wall)
            self.failures.answered()
            return reply

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _answered(context: grpc.ServicerContext) -> bool:
    """Whether the service has set the call's status (``context.abort`` raises a bare
    exception, chained to what the service caught)."""
    code = getattr(context, "code", None)
    return callable(code) and code() is not None


def _is_localhost(name: str) -> bool:
    """Whether gRPC's resolver answers ``name`` with the loopback address of each family
    (RFC 6761), even where the system's resolver gives only one: binding the name would take
    ``::1`` too, and share it with a proxy already there."""
    lowered = name.lower()
    return lowered == "localhost" or lowered.endswith(".localhost")


def _addresses(host: str, port: int) -> list[tuple[int, Any]]:
    """Every (family, socket address) ``host`` resolves to, each once."""
    bare = host.strip("[]")
    try:
        infos = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM)
    except OSError as e:
        if not _is_localhost(bare):
            raise ConfigError(f"--host {host!r} cannot be resolved ({e.strerror or e})") from e
        infos = []
    if _is_localhost(bare):
        for loopback in ("127.0.0.1", "::1"):
            infos += socket.getaddrinfo(loopback, port, type=socket.SOCK_STREAM)
    found: dict[tuple[Any, ...], tuple[int, Any]] = {}
    for family, _, _, _, where in infos:
        found.setdefault(where[:2], (family, where))
    return list(found.values())


def bind_address(host: str, port: int) -> list[str]:
    """The ``address:port`` targets gRPC binds for ``host`` (an IPv6 address in brackets), once
    the host resolves and the port is free on every address it resolves to. gRPC is given the
    addresses, never the name: its resolver may find more addresses than the one probed here,
    share the port with another proxy on those, and print its own lines."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is not a port: choose one in 1..65535")
    targets: list[str] = []
    failure: OSError | None = None
    for family, where in _addresses(host, port):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # SO_REUSEADDR as gRPC sets it (a proxy restarted at once finds its port free),
            # but not SO_REUSEPORT: a port another process listens on is refused.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(where)
            except OSError as e:
                if e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    # An address this machine lacks (IPv6 switched off, say) is left out, as
                    # gRPC leaves it: the port is served on the others.
                    failure = e
                    continue
                what = (
                    "is in use (another proxy?)"
                    if e.errno == errno.EADDRINUSE
                    else f"cannot be opened ({e.strerror or e})"
                )
                raise ConfigError(f"port {port} on {host} {what}: choose another --port") from e
        address = str(where[0])
        targets.append(f"[{address}]:{port}" if ":" in address else f"{address}:{port}")
    if not targets:
        why = f" ({failure.strerror or failure})" if failure else ""
        raise ConfigError(f"port {port} on {host} cannot be opened{why}: choose another --host")
    return targets


def is_public(host: str) -> bool:
    """Whether ``host`` is reachable from other machines (not a loopback address)."""
    bare = host.strip("[]")
    if bare in ("0.0.0.0", "::", ""):
        return True
    try:
        resolved = str(socket.getaddrinfo(bare, None)[0][4][0])
        return not ipaddress.ip_address(resolved.split("%")[0]).is_loopback
    except (OSError, ValueError):
        return True


def proxy_server(
    storage: optuna.storages.BaseStorage,
    host: str,
    port: int,
    *,
    secret: str | None = None,
    threads: int = DEFAULT_CONNECTIONS,
    log: Callable[[str], None] = lambda line: None,
    stats: CallStats | None = None,
) -> Any:
    """The proxy's gRPC server (not yet started) on ``host:port``, and on it alone: Optuna's
    service on ``storage`` with Optuna's cache in front of it (its reads shared between
    waiting requests), tauopt's batched calls, and the guard of both, which counts every
    call in ``stats``; ``threads`` calls at once (each holds at most one database
    connection)."""
    targets = bind_address(host, port)
    rdb = private.rdb_of(storage)
    stats = stats if stats is not None else CallStats()
    cache = private.CoalescedCache(rdb)
    server = private.proxy_server_with(
        cache,
        threads=threads,
        interceptors=[_Guard(secret, log, stats)],
        options=[("grpc.so_reuseport", 0)],
    )
    from tauopt.storage._rdb import study_lock  # _rdb opens proxies: imported here, not above

    service = TauoptService(rdb, study_lock, stats, reader=cache)
    server.add_generic_rpc_handlers((service.handler(),))
    try:
        for target in targets:
            server.add_insecure_port(target)
    except RuntimeError as e:  # taken between the check and now
        raise ConfigError(f"port {port} on {host} cannot be opened: choose another --port") from e
    return server


def serve(
    storage: optuna.storages.BaseStorage,
    host: str,
    port: int,
    *,
    ready: Callable[[], None] = lambda: None,
    secret: str | None = None,
    threads: int = DEFAULT_CONNECTIONS,
    log: Callable[[str], None] = lambda line: None,
    stats_seconds: float = 0.0,
) -> None:
    """Serve ``storage`` through the proxy until interrupted; ``ready`` is called once it
    listens. With ``stats_seconds`` > 0 a line of what the calls cost is logged that often."""
    stats = CallStats()
    server = proxy_server(storage, host, port, secret=secret, threads=threads, log=log, stats=stats)
    server.start()
    stop = threading.Event()
    if stats_seconds > 0:
        log_every(stats, stats_seconds, log, stop)
    ready()
    try:
        server.wait_for_termination()
    finally:
        stop.set()
