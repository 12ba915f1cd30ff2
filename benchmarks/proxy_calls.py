"""The calls a worker makes through the proxy, per trial: N worker threads on a study of a
SQLite database behind ``tauopt proxy``, the training replaced by a sleep (as in
``many_workers.py``), every call of Optuna's service and of tauopt's own counted on the
client. ``--service off`` makes the workers use Optuna's calls alone, as with a proxy
without tauopt's service. Counts, not timings: they do not depend on the machine's load.

    python benchmarks/proxy_calls.py --workers 10 --trials 40 [--service off] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import many_workers
from _machine import JSON_HELP, machine, result_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _count(counts: collections.Counter[str], service: bool) -> None:
    """Wrap every call of each new proxy client so that it is counted."""
    from tauopt.storage import _proxy, _service

    if not service:
        _service.ServiceClient._call = lambda self, name, request: None  # type: ignore[method-assign]
    init = _proxy.ProxyClient.__init__

    def counted_init(self: Any, **kwargs: Any) -> None:
        init(self, **kwargs)
        for name in dir(self._stub):
            if name[:1].isupper():
                setattr(self._stub, name, _counted(counts, name, getattr(self._stub, name)))
        call = self.service._call

        def service_call(name: str, request: dict[str, Any]) -> Any:
            reply = call(name, request)
            if reply is not None:
                counts[f"tauopt.Storage/{name}"] += 1
            return reply

        self.service._call = service_call

    _proxy.ProxyClient.__init__ = counted_init  # type: ignore[method-assign]


def _counted(counts: collections.Counter[str], name: str, fn: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        counts[f"optuna/{name}"] += 1
        return fn(*args, **kwargs)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--service", choices=("on", "off"), default="on")
    parser.add_argument("--json", type=Path, help=JSON_HELP)
    args = parser.parse_args()
    args.json = args.json or result_path(__file__, "cpu", f"service-{args.service}")
    counts: collections.Counter[str] = collections.Counter()
    _count(counts, args.service == "on")
    claims: list[float] = []
    many_workers._patch(0.2, claims, {})
    from tauopt.storage import RetryPolicy, StorageSettings
    from tauopt.study import Worker, WorkerOptions

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tiny.toml").write_text(many_workers.TINY)
        db, port = f"sqlite:///{tmp}/db.sqlite", free_port()
        create = ["create", "--storage", db, "--study", "s", "--config", f"{tmp}/tiny.toml"]
        subprocess.run(
            [sys.executable, "-m", "tauopt", *create, "--n-trials", str(args.trials)],
            check=True,
            capture_output=True,
        )
        proxy = subprocess.Popen(
            [sys.executable, "-m", "tauopt", "proxy", "--storage", db, "--port", str(port)],
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proxy.stderr is not None
        proxy.stderr.readline()  # "... listening on ..."
        settings = StorageSettings(
            url=f"grpc://127.0.0.1:{port}", heartbeat_interval=5, grace_period=60
        )

        def run(i: int) -> None:
            options = WorkerOptions(
                artifact_dir=Path(tmp) / "a",
                device="cpu",
                quiet=True,
                sampler_seed=i,
                retry=RetryPolicy(limit=30.0),
                poll_seconds=1.0,
            )
            Worker(settings, "s", options).run()

        start = time.monotonic()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(args.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - start
        proxy.terminate()
        proxy.wait()
    summary = {
        **machine(),
        "service": args.service,
        "workers": args.workers,
        "trials": args.trials,
        "claims": len(claims),
        "wall_seconds": round(wall, 1),
        "calls_per_trial": {name: round(n / args.trials, 2) for name, n in counts.most_common()},
    }
    print(json.dumps(summary, indent=1))
    args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
