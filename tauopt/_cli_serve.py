"""The commands that serve a study's database: ``tauopt proxy`` (Optuna's gRPC storage proxy,
for workers) and ``tauopt dashboard`` (optuna-dashboard, for people)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tauopt._cli_args import (
    add_artifacts,
    add_command,
    at_most,
    non_negative_seconds,
    positive_int,
    warn,
)
from tauopt._dashboard import Door, bind, hide_study_attrs, warn_if_public
from tauopt.errors import ConfigError
from tauopt.storage import (
    PROXY_SECRET_ENV,
    StorageSettings,
    artifact_store,
    bind_address,
    default_artifact_dir,
    is_public_host,
    open_storage,
    proxy_secret,
    redact,
    resolve_url,
    serve_proxy,
)
from tauopt.study import INTERNAL_STUDY_ATTRS


def add_proxy(sub: Any) -> None:
    p = add_command(
        sub,
        "proxy",
        "serve a database to workers through Optuna's gRPC storage proxy",
        "Serve the database of --storage through Optuna's gRPC storage proxy, with Optuna's "
        "cache in front of it: every command then takes --storage grpc://HOST:PORT, and a "
        "worker host needs only that address, no database credentials. The proxy holds the "
        "database connections, so hundreds of workers share a few. With $TAUOPT_PROXY_SECRET "
        "set, it takes only calls that present the same secret (set it on every worker "
        "host); without one, anyone who reaches its port can read, change and delete every "
        "study.",
    )
    p.add_argument(
        "--storage",
        default=None,
        help="the database to serve (default: $TAUOPT_STORAGE, else sqlite:///./tauopt.db)",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address")
    p.add_argument("--port", type=int, default=13000, help="port")
    p.add_argument(
        "--db-connections",
        type=positive_int,
        default=8,
        metavar="N",
        help="database connections the proxy holds at most (>= 2; docs/deployment.md says how "
        "to size it)",
    )
    p.add_argument(
        "--stats",
        type=at_most(non_negative_seconds, 86400.0, "must be at most a day (86400 s)"),
        default=300.0,
        metavar="S",
        help="log every S seconds how many calls the proxy served and the CPU they took, per "
        "kind of call (0: never; default 300)",
    )
    p.set_defaults(handler=_cmd_proxy)


def add_dashboard(sub: Any) -> None:
    p = add_command(
        sub,
        "dashboard",
        "optuna-dashboard on the same storage and artifacts",
        "optuna-dashboard on the same storage and artifacts. It answers only requests for "
        "the address it listens on, localhost, an IP address or a name given with "
        "--allow-host (a web page cannot reach it by DNS rebinding). Give the storage's "
        "password in $TAUOPT_STORAGE or libpq's PGPASSWORD rather than on the command line, "
        "where `ps` shows it.",
    )
    p.add_argument("--storage", default=None, help="database URL (as for the other commands)")
    add_artifacts(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address")
    p.add_argument("--port", type=int, default=8080, help="port")
    p.add_argument(
        "--read-only",
        action="store_true",
        help="refuse every change: no study, trial or note can be deleted or edited",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests for this host name (the name users type in the browser)",
    )
    p.set_defaults(handler=_cmd_dashboard)


def _cmd_dashboard(args: argparse.Namespace) -> int:
    import optuna_dashboard  # deferred: only this command serves it

    url = resolve_url(args.storage)
    storage = open_storage(StorageSettings(url=url), create_schema=False)
    hide_study_attrs(storage, INTERNAL_STUDY_ATTRS)
    # The dashboard only reads the models (compose mounts their volume read-only); it makes
    # the folder only where no worker has yet.
    folder = Path(args.artifact_dir or default_artifact_dir(url))
    store = artifact_store(folder, create=not folder.is_dir())
    app = optuna_dashboard.wsgi(storage, artifact_store=store)
    door = Door(app, allowed=[args.host, *args.allow_host], read_only=args.read_only)
    server = bind(door, args.host, args.port)
    warn_if_public(args.host)
    mode = " (read-only)" if args.read_only else ""
    print(
        f"optuna-dashboard{mode} for {redact(url)} on http://{args.host}:{args.port}/dashboard",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def _cmd_proxy(args: argparse.Namespace) -> int:
    url = resolve_url(args.storage)
    if url.startswith("grpc://"):
        raise ConfigError(f"--storage {url}: the proxy serves a database, not another proxy")
    secret = proxy_secret()
    bind_address(args.host, args.port)  # before the database: a taken port is one line
    storage = open_storage(
        StorageSettings(url=url, pool_size=args.db_connections), create_schema=True
    )
    if is_public_host(args.host):
        warn(
            f"proxy: warning: listening on {args.host}: "
            + (
                "calls must present the shared secret, but it and every study travel "
                "unencrypted: keep the port on a network you trust"
                if secret
                else f"no ${PROXY_SECRET_ENV} is set, so anyone who reaches this port can read, "
                "change and delete every study (the dashboard's --read-only protects nothing "
                "while they can); set one, or bind to 127.0.0.1"
            )
        )

    def ready() -> None:
        bare = args.host.strip("[]")
        host = f"[{bare}]" if ":" in bare else bare
        guard = "shared secret required" if secret else "no secret: open to all who reach it"
        print(
            f"proxy for {redact(url)} listening on grpc://{host}:{args.port} ({guard}, at most "
            f"{args.db_connections} database connections)",
            file=sys.stderr,
            flush=True,
        )

    serve_proxy(
        storage,
        args.host,
        args.port,
        ready=ready,
        secret=secret,
        threads=args.db_connections,
        log=lambda line: warn(f"proxy: {line}"),
        stats_seconds=args.stats,
    )
    return 0
