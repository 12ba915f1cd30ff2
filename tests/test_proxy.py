"""Through Optuna's gRPC storage proxy (``tauopt proxy``) in front of the real PostgreSQL: what
holds on a direct database holds there too. The exact budget, dead workers' trials rerun,
SIGTERM handing back the trial, a proxy restarted under the workers, ``reproduce`` started by
several processes at once, and the readers (best, export, the dashboard)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest
from conftest import free_port
from optuna.trial import TrialState
from test_faults import CONFIG, Worker
from test_stopping import assert_dominated_rule, run_two_workers

pytestmark = pytest.mark.postgres


class Proxy:
    """A ``tauopt proxy`` process in front of one database, which can be restarted."""

    def __init__(self, database: str) -> None:
        self.database, self.port = database, free_port()
        self.url = f"grpc://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "tauopt", "proxy", "--storage", self.database]
        self.proc = subprocess.Popen(
            [*argv, "--port", str(self.port)], stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        pytest.fail("the proxy did not come up")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture()
def proxy(scratch_database: tuple[str, Callable[[], None]]) -> Iterator[Proxy]:
    served = Proxy(scratch_database[0])
    served.start()
    yield served
    served.stop()


def _create(
    tmp_path: Path, url: str, n_trials: int, *, epochs: int = 2, train_size: int = 5000
) -> str:
    name = f"proxy-{uuid.uuid4().hex[:8]}"
    # No accuracy floor: the readers (`best`) must find the front of trials this small (one
    # epoch on 1,000 images reaches 0.12-0.61, three in four under the default floor of 0.5,
    # so now and then all nine trials of a study were infeasible and `best` rightly empty).
    floor = "[study]\nmin_val_accuracy = 0.0\n"
    config = floor + CONFIG.format(epochs=epochs, train_size=train_size)
    (tmp_path / "study.toml").write_text(config)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tauopt",
            "create",
            "--storage",
            url,
            "--study",
            name,
            "--config",
            str(tmp_path / "study.toml"),
            "--n-trials",
            str(n_trials),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return name


def _states(database: str, name: str) -> list[TrialState]:
    return [t.state for t in optuna.load_study(study_name=name, storage=database).get_trials()]


def _exact(database: str, name: str, n: int, workers: list[Worker]) -> None:
    codes = [w.finish() for w in workers]
    outputs = "\n---\n".join(w.output for w in workers)
    assert codes == [0] * len(workers), outputs
    assert "Traceback" not in outputs, outputs
    states = _states(database, name)
    assert states.count(TrialState.COMPLETE) == n, (states, outputs)
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states


def _running(worker: Worker, database: str, name: str) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for t in optuna.load_study(study_name=name, storage=database).get_trials():
            if t.state == TrialState.RUNNING and t.user_attrs.get("worker", "").endswith(
                f":{worker.proc.pid}"
            ):
                return t.number
        time.sleep(0.2)
    pytest.fail(f"the worker never started a trial:\n{worker.output}")


def test_workers_through_the_proxy_keep_the_exact_budget(
    proxy: Proxy, tmp_path: Path, data_dir: Path
) -> None:
    name = _create(tmp_path, proxy.url, 9, epochs=1, train_size=1000)
    artifacts = tmp_path / "artifacts"
    workers = [
        Worker(proxy.url, name, artifacts, data_dir, 1),
        Worker(proxy.url, name, artifacts, data_dir, 2),
        Worker(proxy.url, name, artifacts, data_dir, 3, "--batch-trials", "3"),
    ]
    _exact(proxy.database, name, 9, workers)
    best = subprocess.run(
        [
            sys.executable,
            "-m",
            "tauopt",
            "best",
            "--storage",
            proxy.url,
            "--study",
            name,
            "--artifact-dir",
            str(artifacts),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert best.returncode == 0 and json.loads(best.stdout), (best.stdout, best.stderr)
    export = subprocess.run(
        [sys.executable, "-m", "tauopt", "export", "--storage", proxy.url, "--study", name],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert export.returncode == 0 and export.stdout.count("\n") >= 10, export.stderr


def test_a_killed_workers_trial_is_rerun_and_sigterm_hands_back_at_once(
    proxy: Proxy, tmp_path: Path, data_dir: Path
) -> None:
    name = _create(tmp_path, proxy.url, 4, epochs=4, train_size=20000)
    artifacts = tmp_path / "artifacts"
    killed = Worker(proxy.url, name, artifacts, data_dir, 1)
    _running(killed, proxy.database, name)
    killed.proc.kill()
    killed.finish(timeout=30)
    stopped = Worker(proxy.url, name, artifacts, data_dir, 2)
    stopped.wait_for("heartbeat went silent", timeout=120)  # the killed one's trial, rerun
    number = _running(stopped, proxy.database, name)
    stopped.proc.send_signal(signal.SIGTERM)
    assert stopped.finish(timeout=60) == 0 and "stopped by SIGTERM" in stopped.output
    trials = {
        t.number: t for t in optuna.load_study(study_name=name, storage=proxy.database).trials
    }
    assert "SIGTERM" in trials[number].user_attrs["retry_reason"]
    _exact(proxy.database, name, 4, [Worker(proxy.url, name, artifacts, data_dir, 3)])


def test_workers_ride_out_a_restarted_proxy(proxy: Proxy, tmp_path: Path, data_dir: Path) -> None:
    n = 10
    name = _create(tmp_path, proxy.url, n, epochs=4, train_size=20000)
    artifacts = tmp_path / "artifacts"
    workers = [Worker(proxy.url, name, artifacts, data_dir, s) for s in (1, 2)]
    # Both must have reached the proxy once (a trial's first epoch comes after its claim went
    # through it): a proxy that never answered a worker is a wrong address to it ("connection
    # refused at first contact" is lasting), not a restart. Read from the workers' own output:
    # polling the database for a RUNNING trial could miss a short one.
    for worker in workers:
        worker.wait_for(" epoch 1/4")
    complete = _states(proxy.database, name).count(TrialState.COMPLETE)
    assert complete <= n - 2, f"{complete} of {n} trials done before the restart: make them longer"
    proxy.stop()
    time.sleep(5)
    proxy.start()
    _exact(proxy.database, name, n, workers)
    assert any("retrying" in w.output for w in workers)


def test_reproduce_by_three_processes_through_the_proxy_enqueues_each_run_once(
    proxy: Proxy,
) -> None:
    argv = [
        sys.executable,
        "-m",
        "tauopt",
        "reproduce",
        "--storage",
        proxy.url,
        "--study",
        "g",
        "--epochs",
        "1",
        "--train-size",
        "100",
    ]
    procs = [subprocess.Popen(argv, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs
    trials = optuna.load_study(study_name="g", storage=proxy.database).get_trials()
    waiting = [t.user_attrs["grid_id"] for t in trials if t.state == TrialState.WAITING]
    assert len(waiting) == len(set(waiting)) == 76
    copies = [t for t in trials if t.state == TrialState.FAIL]
    assert all("duplicate_of" in t.user_attrs for t in copies)


def test_the_dashboard_reads_through_the_proxy(proxy: Proxy, tmp_path: Path) -> None:
    _create(tmp_path, proxy.url, 2)
    port = free_port()
    dashboard = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tauopt",
            "dashboard",
            "--storage",
            proxy.url,
            "--port",
            str(port),
            "--artifact-dir",
            str(tmp_path / "a"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as r:
                    studies = json.loads(r.read())["study_summaries"]
                    break
            except OSError:
                time.sleep(0.5)
        assert [s["study_name"] for s in studies] == [studies[0]["study_name"]]
        assert studies[0]["study_name"].startswith("proxy-")
    finally:
        dashboard.terminate()
        dashboard.wait(timeout=30)


def test_dominated_stopping_through_the_proxy(proxy: Proxy, tmp_path: Path, data_dir: Path) -> None:
    run_two_workers(proxy.url, tmp_path, data_dir)
    assert_dominated_rule(proxy.database)
