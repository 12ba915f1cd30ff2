"""Workers stopped in the middle of a trial, as preemptible machines stop them: SIGTERM (the
trials' states saved, the trials handed back) and SIGKILL (their latest periodic states left
behind), one trial at a time and a population of four, on SQLite and PostgreSQL.

Another worker goes on with every stopped trial from its saved state, and each trial's final
metrics and every per-epoch record equal, bitwise, those of a study whose worker was never
stopped (same machine, one thread each). The trial's record, note and export say where it
resumed; no state file is left once the study is done.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import PG_URL, worker_argv
from optuna.trial import TrialState

from tauopt._cli import main
from tauopt.storage import StorageSettings, open_storage
from tauopt.study import TrialRecord, create_study, load_config
from tauopt.study._views import trial_note, view_of

# Every parameter fixed (a trial's seed is its number): two studies of this config train the
# same runs. Pruning removes blocks in the middle of the run; a state is saved every second.
CONFIG = """
[study]
anchors = 0
[search]
arch = "resnet"
depth = 5
width = 64
T = 1.0
l1 = 0.005
layer_prune_eps = 0.08
time_reg = "none"
lr = 0.1
[trial]
epochs = 30
train_size = 6000
val_size = 1000
checkpoint_seconds = 1
[storage]
heartbeat_interval = 1
grace_period = 4
"""
#: What must be equal, bitwise, between a resumed trial and the same trial never stopped.
METRICS = (
    "val_accuracy",
    "test_accuracy",
    "taus",
    "active_params",
    "active_block_ids",
    "pruned_layers",
    "val_accuracy_history",
    "train_accuracy_history",
    "train_loss_history",
    "clean_loss_history",
    "penalty_history",
    "tau_history",
)
TRIALS = {1: 1, 4: 4}  # one trial alone, or one population (the retries keep the seeds)


class Worker:
    """A ``tauopt worker`` process (one thread), its output collected as it comes."""

    def __init__(self, url: str, name: str, artifacts: Path, data_dir: Path, k: int) -> None:
        argv = worker_argv(url, name, data_dir, artifacts, "--threads", "1")
        self.proc = subprocess.Popen(
            [*argv, "--batch-trials", str(k)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_until(self, done: Any, what: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                pytest.fail(f"never {what}:\n{self.output}")
            time.sleep(0.02)

    def finish(self, timeout: float = 300) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # faulthandler: every thread's stack
            self.proc.wait(timeout=30)
            self._reader.join(timeout=5)
            pytest.fail(f"the worker hung:\n{self.output}")
        self._reader.join(timeout=5)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def _create(tmp_path: Path, url: str, k: int) -> str:
    name = f"preempt-{uuid.uuid4().hex[:10]}"
    path = tmp_path / "study.toml"
    path.write_text(CONFIG)
    config = load_config(path).with_overrides(n_trials=TRIALS[k])
    create_study(StorageSettings(url=url, heartbeat_interval=1, grace_period=4), name, config)
    return name


def _trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(StorageSettings(url=url), create_schema=False)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials()
    finally:
        engine = getattr(storage, "engine", None)
        if engine is not None:
            engine.dispose()


def _by_seed(url: str, name: str, k: int) -> dict[int, dict[str, Any]]:
    trials = _trials(url, name)
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == TRIALS[k], states  # the exact budget
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    assert not [t for t in trials if "fail_reason" in t.user_attrs]
    return {t.user_attrs["seed"]: t.user_attrs for t in trials if t.state == TrialState.COMPLETE}


@pytest.fixture(scope="module")
def uninterrupted(
    tmp_path_factory: pytest.TempPathFactory, data_dir: Path
) -> dict[int, dict[int, dict[str, Any]]]:
    """Per K, the study's trials by seed, trained by a worker never stopped."""
    out = {}
    for k in TRIALS:
        folder = tmp_path_factory.mktemp(f"uninterrupted-{k}")
        url = f"sqlite:///{folder / 'study.db'}"
        name = _create(folder, url, k)
        worker = Worker(url, name, folder / "artifacts", data_dir, k)
        assert worker.finish() == 0, worker.output
        out[k] = _by_seed(url, name, k)
        assert all(not attrs["resumed_from"] for attrs in out[k].values())
    return out


def _states(artifacts: Path) -> list[Path]:
    folder = artifacts / "checkpoints"
    return sorted(folder.glob("*.pt")) if folder.is_dir() else []


STORAGES = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
]


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("k", [1, 4], ids=["K1", "K4"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_worker_s_trials_resume_with_the_results_of_an_uninterrupted_run(
    tmp_path: Path,
    data_dir: Path,
    uninterrupted: dict[int, dict[int, dict[str, Any]]],
    storage: str,
    k: int,
    sig: signal.Signals,
) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}" if storage == "sqlite" else PG_URL
    name = _create(tmp_path, url, k)
    artifacts = tmp_path / "artifacts"
    first = Worker(url, name, artifacts, data_dir, k)
    if sig == signal.SIGTERM:
        first.wait_until(lambda: "epoch 5/30" in first.output, "trained 5 epochs")
        first.proc.send_signal(sig)
        assert first.finish(timeout=60) == 0, first.output
        assert "stopped by SIGTERM" in first.output and "Traceback" not in first.output
        assert first.output.count("it goes on from epoch") == k, first.output
    else:
        # every member's periodic state on disk, then killed between two saves (a second of
        # training apart)
        first.wait_until(lambda: len(_states(artifacts)) == k, "saved a state")
        time.sleep(0.2)
        first.proc.send_signal(sig)
        first.finish(timeout=30)
    assert len(_states(artifacts)) == k
    second = Worker(url, name, artifacts, data_dir, k)
    assert second.finish() == 0, second.output
    assert "Traceback" not in second.output and "starts again" not in second.output
    assert second.output.count("goes on from its state after epoch") == k, second.output
    got = _by_seed(url, name, k)
    want = uninterrupted[k]
    assert sorted(got) == sorted(want)
    resumed = [seed for seed, attrs in got.items() if attrs["resumed_from"]]
    assert len(resumed) == k
    for seed, attrs in got.items():
        for metric in METRICS:
            assert attrs[metric] == want[seed][metric], (seed, metric)
    assert _states(artifacts) == []  # every trial ended: no state is left
    # the note and the export say where the trial resumed
    seed = resumed[0]
    (point,) = got[seed]["resumed_from"]
    assert point["epoch"] >= 1
    record = TrialRecord.from_attrs(got[seed])
    assert "**Resumed** from a saved state after a stop: after epoch" in trial_note(
        view_of(seed, record, feasible=True)
    )
    exported = tmp_path / "trials.csv"
    assert main(["export", "--storage", url, "--study", name, "-o", str(exported)]) == 0
    with open(exported, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["state"] == "COMPLETE"]
    assert sum(1 for r in rows if r["resumed_from"] != "[]") == k


def _grid(url: str, name: str) -> None:
    argv = ["reproduce", "--storage", url, "--study", name, "--epochs", "12"]
    assert main([*argv, "--train-size", "4000", "--datasets", "mnist", "--only", "pruning"]) == 0


def _by_grid_id(url: str, name: str) -> dict[str, dict[str, Any]]:
    trials = _trials(url, name)
    done = {t.user_attrs["grid_id"]: t.user_attrs for t in trials if t.state == TrialState.COMPLETE}
    assert len(done) == 4 and not [t for t in trials if t.state == TrialState.RUNNING]
    return done


@pytest.mark.postgres
def test_the_authors_grid_through_the_proxy_resumes_with_the_results_of_an_uninterrupted_run(
    tmp_path: Path, data_dir: Path, scratch_database: tuple[str, Any]
) -> None:
    """Four runs of the authors' grid (test accuracy every epoch) as one population, through
    ``tauopt proxy``: SIGTERM, then another worker; the same results as on SQLite uninterrupted."""
    from test_proxy import Proxy

    local = f"sqlite:///{tmp_path / 'whole.db'}"
    _grid(local, "grid")
    whole = Worker(local, "grid", tmp_path / "whole", data_dir, 4)
    assert whole.finish() == 0, whole.output
    want = _by_grid_id(local, "grid")
    proxy = Proxy(scratch_database[0])
    proxy.start()
    try:
        _grid(proxy.url, "grid")
        artifacts = tmp_path / "artifacts"
        first = Worker(proxy.url, "grid", artifacts, data_dir, 4)
        first.wait_until(lambda: "epoch 3/12" in first.output, "trained 3 epochs")
        first.proc.send_signal(signal.SIGTERM)
        assert first.finish(timeout=60) == 0, first.output
        assert first.output.count("it goes on from epoch") == 4, first.output
        second = Worker(proxy.url, "grid", artifacts, data_dir, 4)
        assert second.finish() == 0, second.output
        assert second.output.count("goes on from its state after epoch") == 4, second.output
        got = _by_grid_id(proxy.url, "grid")
    finally:
        proxy.stop()
    for grid_id, attrs in got.items():
        assert attrs["resumed_from"]
        for metric in (*METRICS, "test_accuracy_history"):
            assert attrs[metric] == want[grid_id][metric], (grid_id, metric)
    assert _states(artifacts) == []


def test_a_damaged_state_starts_the_trial_again_with_one_line_and_the_same_result(
    tmp_path: Path, data_dir: Path, uninterrupted: dict[int, dict[int, dict[str, Any]]]
) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    name = _create(tmp_path, url, 1)
    artifacts = tmp_path / "artifacts"
    first = Worker(url, name, artifacts, data_dir, 1)
    first.wait_until(lambda: "epoch 5/30" in first.output, "trained 5 epochs")
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish(timeout=60) == 0, first.output
    (path,) = _states(artifacts)
    path.write_bytes(path.read_bytes()[:1000])  # cut short, as by a full disk elsewhere
    second = Worker(url, name, artifacts, data_dir, 1)
    assert second.finish() == 0, second.output
    assert second.output.count("starts again from epoch 0: its saved state") == 1, second.output
    assert "is damaged" in second.output and "Traceback" not in second.output
    (attrs,) = _by_seed(url, name, 1).values()
    assert attrs["resumed_from"] == []
    for metric in METRICS:
        assert attrs[metric] == uninterrupted[1][0][metric], metric
    assert _states(artifacts) == []


SMALL = """
[study]
anchors = 0
[search]
depth = 3
width = 32
[trial]
epochs = 3
train_size = 2000
val_size = 500
checkpoint_seconds = 0.01
"""


def test_a_folder_for_states_that_cannot_be_written_leaves_trials_training_and_is_said_once(
    workdir: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    artifacts = workdir / "artifacts"
    artifacts.mkdir()
    (artifacts / "checkpoints").write_text("a file where the folder should be")
    argv = ["run", "--data-dir", str(data_dir), "--config", "small.toml", "--n-trials", "3"]
    assert main([*argv, "--artifact-dir", str(artifacts), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("cannot save the states of running trials") == 1, err
    assert "3 complete" in err
