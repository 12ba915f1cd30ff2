"""Optuna's gRPC storage proxy: ``tauopt proxy`` serves a database to any number of workers,
which need only its address (``--storage grpc://HOST:PORT``), no database credentials. The
proxy holds the database connections and Optuna's cache of the studies."""

from __future__ import annotations

import warnings
from urllib.parse import urlsplit

import optuna

from tauopt.errors import ConfigError, StorageError
from tauopt.storage import _optuna as private

SCHEME = "grpc://"
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


def open_proxy(url: str) -> optuna.storages.BaseStorage:
    """A client of the proxy at ``url``, once it answers."""
    host, port = address(url)
    with warnings.catch_warnings():  # experimental since Optuna 4.2; relied on knowingly
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        proxy = optuna.storages.GrpcStorageProxy(host=host, port=port)
    try:
        proxy.wait_server_ready(timeout=_READY_SECONDS)
    except TimeoutError as e:
        raise StorageError(
            f"nothing answers at {url} within {_READY_SECONDS:g} s: start the proxy (tauopt "
            "proxy) or check the address in --storage"
        ) from e
    return proxy


def serve(storage: optuna.storages.BaseStorage, host: str, port: int) -> None:
    """Serve ``storage`` (with Optuna's cache in front of it, its reads shared between waiting
    requests) until interrupted."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is not a port: choose one in 1..65535")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.run_grpc_proxy_server(
            private.CoalescedCache(private.rdb_of(storage)), host=host, port=port
        )
