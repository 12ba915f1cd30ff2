"""Optuna's gRPC storage proxy: ``tauopt proxy`` serves a database to any number of workers,
which need only its address (``--storage grpc://HOST:PORT``), no database credentials. The
proxy holds the database connections and Optuna's cache of the studies; beside Optuna's
service it serves tauopt's batched attribute calls (:mod:`tauopt.storage._service`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Container
from typing import Any
from urllib.parse import urlsplit

import optuna
from optuna.trial import FrozenTrial, TrialState

from tauopt.errors import ConfigError, StorageError
from tauopt.storage import _optuna as private
from tauopt.storage._service import ServiceClient, TauoptService

SCHEME = "grpc://"
_WAITING = TrialState.WAITING
#: Seconds a command waits for the proxy to answer at first contact.
_READY_SECONDS = 10.0


def is_proxy_url(url: str) -> bool:
    return url.startswith(SCHEME)


def address(url: str) -> tuple[str, int]:
    """``grpc://HOST:PORT`` as (host, port)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or parts.path not in ("", "/"):
        raise ConfigError(f"{url!r} is not a proxy address: use grpc://HOST:PORT")
    return parts.hostname, port


class ProxyClient(optuna.storages.GrpcStorageProxy):
    """Optuna's client of the proxy, with tauopt's service as :attr:`service`."""

    def __init__(self, *, host: str, port: int) -> None:
        super().__init__(host=host, port=port)
        self.address = (host, port)
        self.service = ServiceClient(self, host, port)

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state.pop("service", None)  # a channel: made anew on the other side
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self.service = ServiceClient(self, *self.address)

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


def open_proxy(url: str) -> ProxyClient:
    """A client of the proxy at ``url``, once it answers."""
    host, port = address(url)
    with warnings.catch_warnings():  # experimental since Optuna 4.2; relied on knowingly
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        proxy = ProxyClient(host=host, port=port)
    try:
        proxy.wait_server_ready(timeout=_READY_SECONDS)
    except TimeoutError as e:
        raise StorageError(
            f"nothing answers at {url} within {_READY_SECONDS:g} s: start the proxy (tauopt "
            "proxy) or check the address in --storage"
        ) from e
    return proxy


def proxy_server(storage: optuna.storages.BaseStorage, host: str, port: int) -> Any:
    """The proxy's gRPC server (not yet started): Optuna's service on ``storage`` with Optuna's
    cache in front of it (its reads shared between waiting requests), and tauopt's batched
    calls on it."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is not a port: choose one in 1..65535")
    rdb = private.rdb_of(storage)
    server = private.proxy_server(private.CoalescedCache(rdb), host, port)
    server.add_generic_rpc_handlers((TauoptService(rdb).handler(),))
    return server


def serve(
    storage: optuna.storages.BaseStorage,
    host: str,
    port: int,
    *,
    ready: Callable[[], None] = lambda: None,
) -> None:
    """Serve ``storage`` through the proxy until interrupted; ``ready`` is called once it
    listens."""
    server = proxy_server(storage, host, port)
    server.start()
    ready()
    server.wait_for_termination()
