"""Several worker processes sharing one study on the real local PostgreSQL."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from conftest import PG_URL, worker_argv
from optuna.artifacts import download_artifact
from optuna.trial import TrialState

from tauopt.storage import StorageSettings, artifact_store, open_storage, study_lock
from tauopt.study import create_study, load_config

pytestmark = pytest.mark.postgres

CONFIG = """
[search]
lr = [0.1, 0.3]
depth = [3, 6]
width = [16, 48]
[trial]
epochs = {epochs}
train_size = {train_size}
val_size = 2000
[storage]
heartbeat_interval = 1
grace_period = 3
"""


@pytest.fixture(scope="module", autouse=True)
def _postgres_is_up() -> None:
    try:
        with sqlalchemy.create_engine(PG_URL).connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
    except sqlalchemy.exc.OperationalError as e:  # a real failure, not a skip: CI must have it
        pytest.fail(f"PostgreSQL at {PG_URL} is not reachable ({e}); start it (see .ci/run)")


def _create(tmp_path: Path, n_trials: int, *, epochs: int, train_size: int) -> tuple[str, Path]:
    name = f"pg-{uuid.uuid4().hex[:10]}"
    path = tmp_path / "study.toml"
    path.write_text(CONFIG.format(epochs=epochs, train_size=train_size))
    config = load_config(path).with_overrides(n_trials=n_trials)
    settings = StorageSettings(url=PG_URL, heartbeat_interval=1, grace_period=3)
    create_study(settings, name, config)
    return name, tmp_path / "artifacts"


def _worker(name: str, artifacts: Path, data_dir: Path, seed: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        worker_argv(
            PG_URL, name, data_dir, artifacts, "--sampler-seed", str(seed), "--threads", "1"
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _finish(procs: list[subprocess.Popen[bytes]], timeout: float = 300) -> list[str]:
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout)
        outputs.append(out.decode())
    return outputs


def _study(name: str) -> optuna.Study:
    return optuna.load_study(
        study_name=name, storage=open_storage(StorageSettings(url=PG_URL), create_schema=False)
    )


def test_three_workers_share_one_budget(tmp_path: Path, data_dir: Path) -> None:
    name, artifacts = _create(tmp_path, 9, epochs=1, train_size=1000)
    procs = [_worker(name, artifacts, data_dir, seed) for seed in range(3)]
    outputs = _finish(procs)
    assert all(p.returncode == 0 for p in procs), outputs
    trials = _study(name).get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) == 9
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) >= 2, "the workers shared the study"
    store = artifact_store(artifacts)
    for t in trials:
        assert {
            "test_accuracy",
            "active_params",
            "taus",
            "tau_history",
            "model_artifact_id",
        } <= set(t.user_attrs)
        target = tmp_path / f"model-{t.number}.pt"
        download_artifact(
            artifact_store=store,
            file_path=str(target),
            artifact_id=t.user_attrs["model_artifact_id"],
        )
        assert target.stat().st_size > 1000


def test_killed_worker_trial_is_failed_and_rerun(tmp_path: Path, data_dir: Path) -> None:
    # 10 epochs (about 1 s): the kill must land inside a trial; with 3 (0.3 s) a trial can
    # start and end between two looks at the database
    name, artifacts = _create(tmp_path, 4, epochs=10, train_size=20000)
    victim = _worker(name, artifacts, data_dir, seed=11)
    study = _study(name)
    deadline = time.monotonic() + 120
    running: list[optuna.trial.FrozenTrial] = []
    while not running and time.monotonic() < deadline:
        time.sleep(0.2)
        running = [
            t
            for t in study.get_trials(states=(TrialState.RUNNING,))
            if t.user_attrs.get("worker", "").endswith(f":{victim.pid}")
        ]
    assert running, "the first worker never started a trial"
    victim.send_signal(signal.SIGKILL)  # at once: the trial just started, it cannot be done yet
    victim.wait()
    # whatever the victim was running when it died stays RUNNING until its heartbeat goes stale
    orphans = [
        t
        for t in study.get_trials(states=(TrialState.RUNNING,))
        if t.user_attrs.get("worker", "").endswith(f":{victim.pid}")
    ]
    assert len(orphans) == 1
    killed = orphans[0].number
    others = [_worker(name, artifacts, data_dir, seed) for seed in (12, 13)]
    outputs = _finish(others)
    assert all(p.returncode == 0 for p in others), outputs

    trials = {t.number: t for t in study.get_trials()}
    assert trials[killed].state == TrialState.FAIL
    assert "fail_reason" not in trials[killed].user_attrs  # failed by heartbeat, not by training
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == trials[killed].params
    assert retries[0].user_attrs["seed"] == killed  # the retry reruns the same training
    completed = [t for t in trials.values() if t.state == TrialState.COMPLETE]
    assert len(completed) == 4


def test_a_stopped_holder_of_the_claim_lock_loses_it_to_the_server(
    scratch_database: tuple[str, Callable[[], None]],
) -> None:
    """A process stopped (SIGSTOP) inside a claim holds the study's lock only for its idle
    limit: the server ends its session and the next claimant gets the lock."""
    url = scratch_database[0]
    optuna.storages.RDBStorage(url).engine.dispose()  # the tables, before the holder starts
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER.format(url=url)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        rdb = optuna.storages.RDBStorage(url)
        start = time.monotonic()
        with study_lock(rdb, "s"):
            waited = time.monotonic() - start
        rdb.engine.dispose()
    finally:
        holder.kill()
        holder.wait()
    assert 1.0 < waited < 30, waited  # it was held, then freed: the holder never resumed


_HOLDER = """
import os, signal, optuna
from tauopt.storage import study_lock
rdb = optuna.storages.RDBStorage({url!r})
with study_lock(rdb, "s", idle_seconds=3):
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
"""
