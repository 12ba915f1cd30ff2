"""Hundreds of workers on one study, simulated: the real worker code (claim, heartbeats,
attributes, model upload, tell), only the training replaced by a sleep of S seconds and a tiny
model. Workers are threads, spread over a few processes.

It makes a database of its own on the PostgreSQL server of ``--postgres`` (a superuser URL),
owned by a role limited to ``--connection-limit`` connections, and runs the workers on it
directly (``--via direct``) or through ``tauopt proxy`` (``--via proxy``). It reports trials
per second, claim latency p50/p99, heartbeat lag (the longest gap between two heartbeats of a
trial, less the interval), the peak of the role's connections, the errors, and whether the
budget came out exact with nothing left running.

Through the proxy, ``--service off`` makes the workers use Optuna's calls alone, as with a proxy
without tauopt's own service (one call per attribute, the claim's questions answered by
reading every unfinished trial), to measure what that service saves, side by side.

    python benchmarks/many_workers.py --postgres postgresql://postgres@127.0.0.1/test \\
        --workers 200 --trial-seconds 2 --via proxy [--processes 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import torch
from _machine import JSON_HELP, machine, result_path

HEARTBEAT = 5
TINY = f"""
[study]
min_val_accuracy = 0.0
[search]
arch = "resnet"
depth = 2
width = 4
[trial]
epochs = 1
train_size = 100
val_size = 100
[storage]
heartbeat_interval = {HEARTBEAT}
grace_period = 60
"""


def _fake_dataset() -> Any:
    from tauopt.engine._data import ImageSet, RawDataset

    gen = torch.Generator().manual_seed(0)
    part = ImageSet(
        torch.randint(0, 256, (300, 784), dtype=torch.uint8, generator=gen),
        torch.randint(0, 10, (300,), generator=gen),
    )
    return RawDataset("mnist", part, part, 10, (28, 28))


def _patch(
    seconds: float, claims: list[float], claim_cpu: list[float], beats: dict[int, list[float]]
) -> None:
    """The training becomes a sleep and a tiny model's result; claims and heartbeats are timed,
    claims also in the CPU time of the thread that claims (Optuna's ask(), the sampler, the
    calls' encoding)."""
    from tauopt.engine import History, TrainResult, build_model
    from tauopt.study import _ledger, _runner, _worker

    def train_population(configs: list[Any], dataset: Any, **_: Any) -> list[Any]:
        time.sleep(seconds)
        out = []
        for config in configs:
            model = build_model(config, 784, 10)
            out.append(
                TrainResult(
                    config=config,
                    device="cpu",
                    test_accuracy=0.5,
                    taus=model.taus.detach().tolist(),
                    active_blocks=2,
                    active_block_ids=[0, 1],
                    active_params=model.num_active_params(),
                    history=History(
                        val_accuracy=[0.5],
                        train_loss=[1.0],
                        taus=[[0.5, 0.5]],
                        epoch_seconds=[seconds],
                        train_seconds=[seconds],
                    ),
                    model=model,
                    initial_params=model.num_active_params(),
                )
            )
        return out

    _runner.train_population = train_population  # type: ignore[assignment]
    dataset = _fake_dataset()
    _worker.Worker.dataset = lambda self, name=None: dataset  # type: ignore[method-assign]
    claim = _ledger.Ledger.claim

    def timed_claim(self: Any, k: int) -> Any:
        start, cpu = time.perf_counter(), time.thread_time()
        try:
            return claim(self, k)
        finally:
            claims.append(time.perf_counter() - start)
            claim_cpu.append(time.thread_time() - cpu)

    _ledger.Ledger.claim = timed_claim  # type: ignore[method-assign]
    from tauopt.storage import _access

    for kind in (_access.DirectAccess, _access.ProxyAccess):
        real = kind.beat

        def beat(self: Any, trial_ids: Any, real: Any = real) -> None:
            real(self, trial_ids)
            for trial_id in trial_ids:
                beats.setdefault(trial_id, []).append(time.monotonic())

        kind.beat = beat  # type: ignore[method-assign]


def _process(
    url: str, study: str, threads: int, seconds: float, artifacts: str, service: bool, out: Any
) -> None:
    from tauopt.storage import RetryPolicy, StorageSettings, _service
    from tauopt.study import Worker, WorkerOptions

    claims: list[float] = []
    claim_cpu: list[float] = []
    beats: dict[int, list[float]] = {}
    errors: list[str] = []
    _patch(seconds, claims, claim_cpu, beats)
    if not service:  # as if the proxy offered no service of tauopt's own: Optuna's calls alone
        _service.ServiceClient._call = lambda self, name, request: None  # type: ignore[method-assign]
    settings = StorageSettings(url=url, heartbeat_interval=HEARTBEAT, grace_period=60)

    def run(i: int) -> None:
        try:
            options = WorkerOptions(
                artifact_dir=Path(artifacts),
                device="cpu",
                quiet=True,
                sampler_seed=i,
                retry=RetryPolicy(limit=120.0),
                poll_seconds=1.0,
            )
            Worker(settings, study, options).run()
        except Exception as e:
            errors.append(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")

    started = _own_cpu()  # after the imports: what the workers spend, not the start-up
    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
        time.sleep(0.01)
    for t in pool:
        t.join()
    lags = [
        max(b - a for a, b in itertools.pairwise(times)) - HEARTBEAT
        for times in beats.values()
        if len(times) > 1
    ]
    out.put(
        {
            "claims": claims,
            "claim_cpu": claim_cpu,
            "cpu": _own_cpu() - started,
            "lags": lags,
            "errors": errors,
        }
    )


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_of(pid: int) -> float | None:
    """CPU seconds (user + system) of process ``pid`` so far; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _backends(role: str) -> dict[int, float]:
    """CPU seconds of the PostgreSQL backends serving ``role`` (their titles name it)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        cpu = _cpu_of(int(entry.name))
        # "postgres: [cluster: ]ROLE DATABASE HOST STATE"
        if title.startswith("postgres: ") and f" {role} " in title and cpu is not None:
            out[int(entry.name)] = cpu
    return out


def _connections(
    admin: str, role: str, peak: list[int], backends: dict[int, float], stop: threading.Event
) -> None:
    """Every half second: the role's connections, and the CPU time of its backends (the last
    reading of each; a backend that ends between two readings loses at most half a second)."""
    engine = sqlalchemy.create_engine(admin, poolclass=sqlalchemy.pool.NullPool)
    query = sqlalchemy.text("SELECT COUNT(*) FROM pg_stat_activity WHERE usename = :r")
    while not stop.wait(0.5):
        with engine.connect() as conn:
            peak.append(int(conn.execute(query, {"r": role}).scalar() or 0))
        backends.update(_backends(role))
    engine.dispose()


def _proxy_calls(url: str) -> dict[str, Any] | None:
    """The proxy's own count of its calls and their CPU time, per method (None: not offered)."""
    from tauopt.storage._proxy import open_proxy

    client = open_proxy(url)
    try:
        return client.service.stats()
    finally:
        client.close()


def _per_trial(calls: dict[str, Any] | None, done: int) -> dict[str, Any] | None:
    """Per finished trial: each method's calls and the milliseconds of CPU they took in the
    thread that served them, largest first."""
    if not calls:
        return None
    rows = sorted(calls["methods"].items(), key=lambda kv: -kv[1]["cpu_seconds"])
    return {
        method: {
            "calls": round(m["calls"] / done, 2),
            "cpu_ms": round(1000 * m["cpu_seconds"] / done, 2),
        }
        for method, m in rows
    }


def _variant(args: argparse.Namespace) -> str:
    """What the result's file name tells of the run: the path, the service, N, and the trials'
    length where it is not the default 2 s."""
    via = "direct" if args.via == "direct" else f"proxy_service-{args.service}"
    length = "" if args.trial_seconds == 2.0 else f"_{args.trial_seconds:g}s"
    return f"{via}_n{args.workers}{length}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", required=True, help="a superuser URL of the server")
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--trial-seconds", type=float, default=2.0)
    parser.add_argument("--trials-per-worker", type=int, default=2)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--connection-limit", type=int, default=20)
    parser.add_argument("--via", choices=("direct", "proxy"), default="proxy")
    parser.add_argument("--service", choices=("on", "off"), default="on")
    parser.add_argument("--json", type=Path, help=JSON_HELP)
    args = parser.parse_args()
    measured_on = machine()  # the code as the run starts (the tree may change while it runs)
    args.json = args.json or result_path(__file__, "cpu", _variant(args))
    from tauopt.storage import normalize_url

    args.postgres = normalize_url(args.postgres)
    tag = uuid.uuid4().hex[:6]
    role, db = f"tauopt_bench_{tag}", f"tauopt_bench_{tag}"
    admin = sqlalchemy.create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(
            sqlalchemy.text(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT {args.connection_limit}")
        )
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {db} OWNER {role}"))
    server = sqlalchemy.engine.make_url(args.postgres)
    database = server.set(username=role, password=None, database=db).render_as_string(
        hide_password=False
    )
    n_trials = args.workers * args.trials_per_worker
    proxy = None
    calls: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tiny.toml").write_text(TINY)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "tauopt",
                "create",
                "--storage",
                database,
                "--study",
                "many",
                "--config",
                f"{tmp}/tiny.toml",
                "--n-trials",
                str(n_trials),
            ],
            check=True,
        )
        url = database
        if args.via == "proxy":
            proxy = subprocess.Popen(
                [sys.executable, "-m", "tauopt", "proxy", "--storage", database, "--port", "13999"],
                stderr=subprocess.DEVNULL,
            )
            url = "grpc://127.0.0.1:13999"
            time.sleep(5)
        peak: list[int] = []
        backends: dict[int, float] = {}
        stop = threading.Event()
        watcher = threading.Thread(
            target=_connections, args=(args.postgres, role, peak, backends, stop)
        )
        proxy_cpu = _cpu_of(proxy.pid) if proxy is not None else None
        watcher.start()
        queue: Any = multiprocessing.get_context("spawn").Queue()
        share = [
            args.workers // args.processes + (i < args.workers % args.processes)
            for i in range(args.processes)
        ]
        start = time.monotonic()
        procs = [
            multiprocessing.get_context("spawn").Process(
                target=_process,
                args=(
                    url,
                    "many",
                    n,
                    args.trial_seconds,
                    f"{tmp}/a",
                    args.service == "on",
                    queue,
                ),
            )
            for n in share
        ]
        for p in procs:
            p.start()
        parts = [queue.get() for _ in procs]
        for p in procs:
            p.join()
        wall = time.monotonic() - start
        stop.set()
        watcher.join()
        if proxy is not None:
            proxy_cpu = (_cpu_of(proxy.pid) or 0.0) - (proxy_cpu or 0.0)
            calls = _proxy_calls(url)
            proxy.terminate()
            proxy.wait()
    trials = optuna.load_study(study_name="many", storage=database).get_trials()
    states = {s: sum(t.state.name == s for t in trials) for s in {t.state.name for t in trials}}
    claims = sorted(c for p in parts for c in p["claims"])
    lags = sorted(lag for p in parts for lag in p["lags"])
    errors = [e for p in parts for e in p["errors"]]
    claim_cpu = [c for p in parts for c in p["claim_cpu"]]
    done = max(states.get("COMPLETE", 0), 1)
    # CPU seconds per finished trial, by who spent them; with every worker starting together,
    # N claims need about N * (a claim's share of these) / cores seconds of this machine.
    cpu = {
        "workers_per_trial": round(sum(p["cpu"] for p in parts) / done, 4),
        "proxy_per_trial": None if proxy_cpu is None else round(proxy_cpu / done, 4),
        "postgres_per_trial": round(sum(backends.values()) / done, 4),
        "claim_thread_mean": round(statistics.fmean(claim_cpu), 4) if claim_cpu else None,
    }
    summary = {
        "via": args.via,
        "tauopt_service": args.service if args.via == "proxy" else None,
        "workers": args.workers,
        "processes": args.processes,
        "trial_seconds": args.trial_seconds,
        "connection_limit": args.connection_limit,
        "n_trials": n_trials,
        "wall_seconds": round(wall, 1),
        "trials_per_second": round(states.get("COMPLETE", 0) / wall, 2),
        "claim_p50_s": round(statistics.median(claims), 3) if claims else None,
        "claim_p99_s": round(claims[int(0.99 * (len(claims) - 1))], 3) if claims else None,
        "heartbeat_lag_max_s": round(lags[-1], 2) if lags else None,
        "peak_connections": max(peak, default=0),
        "errors": len(errors),
        "first_errors": errors[:5],
        "states": states,
        "exact_budget": states.get("COMPLETE", 0) == n_trials and not states.get("RUNNING"),
        "cpu_seconds": cpu,
        "proxy_calls_per_trial": _per_trial(calls, done),
    }
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        conn.execute(sqlalchemy.text(f"DROP ROLE IF EXISTS {role}"))
    summary = {**measured_on, **summary}
    print(json.dumps(summary, indent=1))
    args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
