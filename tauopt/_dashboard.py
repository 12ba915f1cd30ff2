"""``tauopt dashboard``: optuna-dashboard's WSGI app behind a door.

The door answers only requests addressed to this server: a ``Host`` header that names a
literal IP address, ``localhost`` or a name given with ``--allow-host``. A web page the user
visits cannot then reach the dashboard by DNS rebinding (its requests carry the page's own
host name), and the dashboard's API deletes studies together with their models. With
``read_only`` it also refuses every request that would change something (any method but
GET, HEAD and OPTIONS).
"""

from __future__ import annotations

import copy
import ipaddress
import socket
import sys
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from tauopt.errors import ConfigError

if TYPE_CHECKING:
    import optuna

_App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
_READS = frozenset({"GET", "HEAD", "OPTIONS"})
_LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain"})


def _host_name(header: str) -> str:
    """The host of a ``Host`` header, without its port (IPv6 literals keep no brackets)."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Door:
    """WSGI middleware: the ``Host`` check and, optionally, read-only access."""

    def __init__(self, app: _App, *, allowed: Iterable[str], read_only: bool) -> None:
        self.app, self.read_only = app, read_only
        self.allowed = _LOCAL_NAMES | {name.lower() for name in allowed}

    def allows_host(self, header: str) -> bool:
        name = _host_name(header.strip().lower()).rstrip(".")
        return _is_ip(name) or name in self.allowed

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        host = environ.get("HTTP_HOST", "")
        if not self.allows_host(host):
            return _refuse(
                start_response,
                "421 Misdirected Request",
                f"this dashboard does not serve the host {host!r}; open it by the address it "
                "listens on, or start it with --allow-host NAME",
            )
        if self.read_only and environ.get("REQUEST_METHOD", "GET") not in _READS:
            return _refuse(start_response, "403 Forbidden", "this dashboard is read-only")
        return self.app(environ, start_response)


def hide_study_attrs(storage: optuna.storages.BaseStorage, keys: Iterable[str]) -> None:
    """Leave the study user attributes ``keys`` out of what optuna-dashboard shows: it lists
    a study's user attributes from ``storage.get_all_studies()``, so this one storage object
    (the dashboard's own) answers that call without them. Every other reader, and every
    write, is untouched."""
    hidden = frozenset(keys)
    read = storage.get_all_studies

    def get_all_studies() -> list[Any]:  # Optuna's FrozenStudy
        shown = []
        for study in read():
            study = copy.copy(study)  # the storage's own object stays as it was
            study.user_attrs = {k: v for k, v in study.user_attrs.items() if k not in hidden}
            shown.append(study)
        return shown

    storage.get_all_studies = get_all_studies  # type: ignore[method-assign]


def _refuse(start_response: Callable[..., Any], status: str, text: str) -> list[bytes]:
    body = (text + "\n").encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """No line per request."""


def bind(app: _App, host: str, port: int) -> WSGIServer:
    """A threaded server for ``app`` bound to ``host:port``, or one line saying why not."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is not a port: choose one in 1..65535")
    try:
        socket.getaddrinfo(host, port)
    except OSError as e:
        raise ConfigError(f"--host {host!r} cannot be resolved ({e.strerror or e})") from e
    server_class = type("Server", (_Server,), {"address_family": _family(host)})
    try:
        return make_server(host, port, app, server_class=server_class, handler_class=_QuietHandler)
    except OSError as e:
        what = "is in use" if e.errno in (98, 48) else f"cannot be opened ({e.strerror or e})"
        raise ConfigError(f"port {port} on {host} {what}: choose another --port") from e


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def warn_if_public(host: str) -> None:
    if host in ("0.0.0.0", "::", "") or not ipaddress.ip_address(_resolved(host)).is_loopback:
        print(
            f"tauopt dashboard: warning: listening on {host}: anyone who reaches this machine "
            "can read every study and, unless --read-only, delete studies with their models",
            file=sys.stderr,
        )


def _resolved(host: str) -> str:
    try:
        return str(socket.getaddrinfo(host, None)[0][4][0])
    except OSError:
        return host
