"""Load: 8 worker processes and at least 300 tiny trials on the real local PostgreSQL, with the
dashboard's API polled throughout. Nothing may be lost, duplicated or left running."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from conftest import free_port, worker_argv
from optuna.trial import TrialState

from tauopt.storage import StorageSettings, open_storage
from tauopt.study import create_study, load_config

pytestmark = pytest.mark.postgres

WORKERS = 8
TRIALS = 300
TINY = """
[search]
width = [8, 16]
depth = [2, 3]
[trial]
epochs = 1
train_size = 200
val_size = 1000
"""


class _Poller(threading.Thread):
    """Asks the dashboard's API for the study list until stopped; keeps the slowest answer."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.stop = url, threading.Event()
        self.answers: list[float] = []
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=30) as response:
                    json.load(response)
                self.answers.append(time.monotonic() - start)
            except OSError as e:
                self.errors.append(str(e))
            self.stop.wait(0.5)


def _dashboard(url: str, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tauopt", "dashboard", "--storage", url, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5):
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail("the dashboard did not answer within 60 s")


def test_eight_workers_three_hundred_trials(
    tmp_path: Path,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    scratch_database: tuple[str, Callable[[], None]],
) -> None:
    # A database of its own: the dashboard lists every study of its database, and the shared
    # test database holds those of every earlier run.
    url, _ = scratch_database
    name = f"load-{uuid.uuid4().hex[:10]}"
    (tmp_path / "tiny.toml").write_text(TINY)
    config = load_config(tmp_path / "tiny.toml").with_overrides(n_trials=TRIALS)
    create_study(StorageSettings(url=url), name, config)
    port = free_port()
    dashboard = _dashboard(url, port)
    poller = _Poller(f"http://127.0.0.1:{port}/api/studies")
    poller.start()
    start = time.monotonic()
    workers = [
        subprocess.Popen(
            worker_argv(url, name, data_dir, tmp_path / "artifacts", "--quiet", "--threads", "1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(WORKERS)
    ]
    try:
        outputs = [w.communicate(timeout=480)[0].decode() for w in workers]
    finally:
        elapsed = time.monotonic() - start
        poller.stop.set()
        poller.join(timeout=35)
        dashboard.terminate()
        dashboard.wait(timeout=10)
    assert [w.returncode for w in workers] == [0] * WORKERS, "\n---\n".join(outputs)
    storage = open_storage(StorageSettings(url=url), create_schema=False)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) == TRIALS  # none lost, none duplicated
    assert all(t.state == TrialState.COMPLETE for t in trials)
    ran = [int(o.split("worker finished: ")[1].split()[0]) for o in outputs]
    assert sum(ran) == TRIALS and min(ran) > 0, ran  # every worker took part
    assert not poller.errors, poller.errors[:3]
    assert len(poller.answers) >= 10
    with capsys.disabled():
        print(
            f"\nload: {WORKERS} workers, {TRIALS} trials in {elapsed:.0f} s "
            f"({TRIALS / elapsed * 60:.0f} trials/min); dashboard answered {len(poller.answers)} "
            f"polls, slowest {max(poller.answers):.2f} s, median "
            f"{sorted(poller.answers)[len(poller.answers) // 2]:.3f} s"
        )
