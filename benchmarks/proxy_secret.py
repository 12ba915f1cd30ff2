"""What the proxy's shared secret costs: every call carries it (a gRPC metadata entry) and the
proxy compares it in constant time before the call reaches the database.

Two measurements, each alternating a proxy without a secret and one with it, side by side in
one run (timings on a shared machine are only comparable so):

* calls: ``--calls`` calls of one kind in a row from one client (Optuna's lookup of a study by
  name, answered from the database; tauopt's count of a study's trials per state), time per
  call, ``--rounds`` rounds of each;
* trials: one worker (one thread) runs ``--trials`` tiny trials (1 epoch on 100 images)
  through the proxy, wall time per trial, ``--pairs`` runs of each.

Both on a SQLite database in a temporary folder, the proxy a process of its own. Usage::

    python benchmarks/proxy_secret.py --data-dir ../shared/data [--calls 2000] [--rounds 5]
        [--trials 40] [--pairs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _machine import JSON_HELP, machine, result_path

SECRET = "benchmark-secret-0123456789abcdef"
TINY = """
[study]
min_val_accuracy = 0.0
anchors = 0
[search]
arch = "resnet"
depth = 2
width = 8
[trial]
epochs = 1
train_size = 100
val_size = 100
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(secret: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TAUOPT_PROXY_SECRET"}
    return {**env, "TAUOPT_PROXY_SECRET": SECRET} if secret else env


class Proxy:
    def __init__(self, url: str, secret: bool) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tauopt", "proxy", "--storage", url, "--port", str(self.port)],
            stderr=subprocess.PIPE,
            text=True,
            env=_env(secret),
        )
        assert self.proc.stderr is not None
        while "listening on" not in self.proc.stderr.readline():
            if self.proc.poll() is not None:
                raise SystemExit("the proxy did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


_CALLS = """
import os, sys, time
from tauopt.storage._proxy import open_proxy
client = open_proxy(sys.argv[1])
sid = client.get_study_id_from_name("tauopt")
n = int(sys.argv[2])
out = []
for kind in ("lookup", "counts"):
    start = time.perf_counter()
    for _ in range(n):
        if kind == "lookup":
            client.get_study_id_from_name("tauopt")
        else:
            client.service.counts(sid, failed_with_attr="fail_reason")
    out.append((time.perf_counter() - start) / n * 1e6)
print(*out)
"""


def _calls(url: str, secret: bool, n: int) -> tuple[float, float]:
    proxy = Proxy(url, secret)
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CALLS, f"grpc://127.0.0.1:{proxy.port}", str(n)],
            capture_output=True,
            text=True,
            env=_env(secret),
            check=True,
        )
    finally:
        proxy.stop()
    lookup, counts = (float(v) for v in done.stdout.split())
    return lookup, counts


def _trials(root: Path, data_dir: Path, secret: bool, n: int, run: str) -> float:
    url = f"sqlite:///{root / f'trials-{run}.db'}"
    (root / "tiny.toml").write_text(TINY)
    create = [sys.executable, "-m", "tauopt", "create", "--storage", url, "--config"]
    subprocess.run([*create, str(root / "tiny.toml"), "--n-trials", str(n)], check=True)
    proxy = Proxy(url, secret)
    try:
        worker = [sys.executable, "-m", "tauopt", "worker", "--storage"]
        worker += [f"grpc://127.0.0.1:{proxy.port}", "--data-dir", str(data_dir), "--quiet"]
        worker += ["--device", "cpu", "--threads", "1", "--artifact-dir", str(root / "a")]
        start = time.perf_counter()
        subprocess.run(worker, check=True, env=_env(secret), capture_output=True)
        return (time.perf_counter() - start) / n
    finally:
        proxy.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--json", type=Path, help=JSON_HELP)
    args = parser.parse_args()
    args.json = args.json or result_path(__file__)
    results: dict[str, Any] = {
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        url = f"sqlite:///{root / 'calls.db'}"
        (root / "tiny.toml").write_text(TINY)
        subprocess.run(
            [sys.executable, "-m", "tauopt", "create", "--storage", url, "--config",
             str(root / "tiny.toml")],
            check=True,
        )  # fmt: skip
        calls: dict[str, list[tuple[float, float]]] = {"open": [], "secret": []}
        for _ in range(args.rounds):
            for mode in ("open", "secret"):
                calls[mode].append(_calls(url, mode == "secret", args.calls))
        trials: dict[str, list[float]] = {"open": [], "secret": []}
        for run in range(args.pairs):
            for mode in ("open", "secret"):
                secret = mode == "secret"
                seconds = _trials(root, args.data_dir, secret, args.trials, f"{mode}-{run}")
                trials[mode].append(seconds)
                print(f"trials {mode}: {seconds:.3f} s per trial", flush=True)
    results["calls_us"] = calls
    results["trial_seconds"] = trials
    for mode in ("open", "secret"):
        lookup = statistics.median(c[0] for c in calls[mode])
        counts = statistics.median(c[1] for c in calls[mode])
        print(
            f"{mode:6}: lookup {lookup:.0f} us, counts {counts:.0f} us per call (median of "
            f"{args.rounds}); {statistics.median(trials[mode]):.3f} s per trial (median of "
            f"{args.pairs})"
        )
    args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
