"""A study under faults, against the real local PostgreSQL: workers that die, stall or are
stopped, connections cut, the database dropped, the disk refusing models. (The server stopped
and restarted: ``test_proxy_faults.py``, on a cluster of its own, directly and through the
proxy; the machine's shared server is never stopped.)

In each case the study ends with exactly its budget of COMPLETE trials, nothing RUNNING, and
every worker exits 0 (the dropped database: they stop with one line naming the cause).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from conftest import PG_URL, worker_argv
from optuna.trial import TrialState

from tauopt.storage import StorageSettings, is_transient, open_storage, root_message
from tauopt.study import create_study, load_config

pytestmark = pytest.mark.postgres

# Trials of about a second, so that a fault lands in the middle of one.
CONFIG = """
[search]
arch = "resnet"
depth = [3, 4]
width = [32, 48]
lr = [0.05, 0.2]
[trial]
epochs = {epochs}
train_size = {train_size}
val_size = 2000
[storage]
heartbeat_interval = 1
grace_period = 4
"""


class Worker:
    """A ``tauopt worker`` process whose output is collected line by line as it comes."""

    def __init__(
        self, url: str, name: str, artifacts: Path, data_dir: Path, seed: int, *extra: str
    ) -> None:
        self.proc = subprocess.Popen(
            # one thread each: two workers at all cores oversubscribe this 2-core machine
            worker_argv(
                url,
                name,
                data_dir,
                artifacts,
                "--sampler-seed",
                str(seed),
                "--threads",
                "1",
                *extra,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            # faulthandler: a worker that hangs is stopped with SIGABRT and prints every
            # thread's stack into its output, which the failing test then shows
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

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if time.monotonic() > deadline or (
                self.proc.poll() is not None and text not in self.output
            ):
                self._reader.join(timeout=2)
                if text in self.output:
                    return
                pytest.fail(f"worker never printed {text!r}:\n{self.output}")
            time.sleep(0.05)

    def finish(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return code

    def abort(self) -> None:
        """Stop a worker that hangs; with faulthandler on, its threads' stacks end its output."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGABRT)
            self.proc.wait(timeout=30)
        self._reader.join(timeout=5)


@pytest.fixture(scope="module", autouse=True)
def _postgres_is_up() -> None:
    try:
        with sqlalchemy.create_engine(PG_URL).connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
    except sqlalchemy.exc.OperationalError as e:  # a real failure, not a skip: CI must have it
        pytest.fail(f"PostgreSQL at {PG_URL} is not reachable ({e}); start it (see .ci/run)")


def _create(
    tmp_path: Path,
    n_trials: int,
    *,
    url: str = PG_URL,
    epochs: int = 2,
    train_size: int = 20000,
    anchors: int = 0,
) -> str:
    name = f"fault-{uuid.uuid4().hex[:10]}"
    path = tmp_path / "study.toml"
    path.write_text(
        f"[study]\nanchors = {anchors}\n" + CONFIG.format(epochs=epochs, train_size=train_size)
    )
    config = load_config(path).with_overrides(n_trials=n_trials)
    create_study(StorageSettings(url=url, heartbeat_interval=1, grace_period=4), name, config)
    return name


def _trials(name: str, url: str = PG_URL) -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(StorageSettings(url=url), create_schema=False)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials()
    finally:
        storage.engine.dispose()


def _finish_all(workers: list[Worker], timeout: float = 300) -> list[int]:
    """Every worker's exit code; one still running after ``timeout`` s fails the test with
    every worker's output, the hung ones' stacks included."""
    deadline = time.monotonic() + timeout
    try:
        return [w.finish(timeout=max(1.0, deadline - time.monotonic())) for w in workers]
    except subprocess.TimeoutExpired:
        for w in workers:
            w.abort()
        outputs = "\n---\n".join(w.output for w in workers)
        pytest.fail(f"a worker was still running after {timeout:g} s:\n{outputs}")


def _assert_exact_budget(name: str, n_trials: int, workers: list[Worker]) -> None:
    codes = _finish_all(workers)
    outputs = "\n---\n".join(w.output for w in workers)
    assert codes == [0] * len(workers), outputs
    assert "Traceback" not in outputs, outputs
    trials = _trials(name)
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == n_trials, (states, outputs)
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))
    # every failure was retried, none was booked against the budget
    assert not [t for t in trials if "fail_reason" in t.user_attrs]


def _running_trial_of(worker: Worker, name: str, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t in _trials(name):
            if t.state == TrialState.RUNNING and t.user_attrs.get("worker", "").endswith(
                f":{worker.proc.pid}"
            ):
                return t.number
        time.sleep(0.1)
    pytest.fail(f"worker never started a trial:\n{worker.output}")


def test_claimed_trial_without_heartbeat_does_not_block(tmp_path: Path, data_dir: Path) -> None:
    """Another process asks for a trial and dies before any heartbeat: the trial is failed
    after the grace period from its start, queued again and run; the worker ends."""
    name = _create(tmp_path, 2, epochs=1, train_size=2000)
    ask = (
        "import optuna, sys\noptuna.load_study(study_name=sys.argv[1], storage=sys.argv[2]).ask()\n"
    )
    subprocess.run([sys.executable, "-c", ask, name, PG_URL], check=True, timeout=60)
    worker = Worker(PG_URL, name, tmp_path / "artifacts", data_dir, seed=1)
    assert worker.finish(timeout=120) == 0, worker.output
    assert "never sent a heartbeat for 4 s: failed and queued again" in worker.output
    trials = _trials(name)
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 2
    assert TrialState.RUNNING not in [t.state for t in trials]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_queues_the_trial_at_once_and_exits_0(
    tmp_path: Path, data_dir: Path, sig: signal.Signals
) -> None:
    # Trials of several seconds: the signal must land while one runs, also in a fast phase.
    name = _create(tmp_path, 4, epochs=5, train_size=50000)
    victim = Worker(PG_URL, name, tmp_path / "artifacts", data_dir, seed=1)
    stopped = _running_trial_of(victim, name)
    victim.proc.send_signal(sig)
    assert victim.finish(timeout=30) == 0, victim.output
    assert f"stopped by {sig.name}" in victim.output and "Traceback" not in victim.output
    # queued again at once, not after the grace period
    trials = {t.number: t for t in _trials(name)}
    assert trials[stopped].state == TrialState.FAIL
    assert sig.name in trials[stopped].user_attrs["retry_reason"]
    retry = [t for t in trials.values() if t.system_attrs.get("failed_trial") == stopped]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING
    other = Worker(PG_URL, name, tmp_path / "artifacts", data_dir, seed=2)
    _assert_exact_budget(name, 4, [other])
    rerun = {t.number: t for t in _trials(name)}[retry[0].number]
    assert rerun.params == trials[stopped].params and rerun.user_attrs["seed"] == stopped


def test_batched_worker_stopped_hands_back_every_trial_of_its_batch(
    tmp_path: Path, data_dir: Path
) -> None:
    name = _create(tmp_path, 6, epochs=5, train_size=50000)
    victim = Worker(PG_URL, name, tmp_path / "artifacts", data_dir, 1, "--batch-trials", "4")
    _running_trial_of(victim, name)
    running = {t.number for t in _trials(name) if t.state == TrialState.RUNNING}
    victim.proc.send_signal(signal.SIGTERM)
    assert victim.finish(timeout=30) == 0, victim.output
    trials = _trials(name)
    for t in trials:
        if t.number in running:  # every trial of the batch still open: failed, queued again
            assert t.state == TrialState.FAIL and "SIGTERM" in t.user_attrs["retry_reason"]
    retries = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.system_attrs["failed_trial"] for t in retries) == sorted(running)
    other = Worker(PG_URL, name, tmp_path / "artifacts", data_dir, 2, "--batch-trials", "4")
    _assert_exact_budget(name, 6, [other])


def test_batched_workers_share_the_budget_and_survive_a_killed_one(
    tmp_path: Path, data_dir: Path
) -> None:
    """Two workers claiming 3 trials at a time, one killed mid-batch: its trials' heartbeats
    go silent, the other worker retries them, and the study ends with exactly 7 trials."""
    name = _create(tmp_path, 7)
    batch = ("--batch-trials", "3")
    killed = Worker(PG_URL, name, tmp_path / "artifacts", data_dir, 1, *batch)
    other = Worker(PG_URL, name, tmp_path / "artifacts", data_dir, 2, *batch)
    _running_trial_of(killed, name)
    killed.proc.kill()
    killed.finish(timeout=30)
    _assert_exact_budget(name, 7, [other])
    assert "heartbeat went silent" in other.output


def test_paused_worker_drops_its_result_and_goes_on(tmp_path: Path, data_dir: Path) -> None:
    # 30 epochs (about 3 s): the pause must land while the trial trains; with 3 (0.4 s) it
    # could land in the worker's next claim, under the study's lock, and stall the other worker
    name = _create(tmp_path, 4, epochs=30)
    paused = Worker(PG_URL, name, tmp_path / "artifacts", data_dir, seed=1)
    _running_trial_of(paused, name)
    paused.proc.send_signal(signal.SIGSTOP)
    other = Worker(PG_URL, name, tmp_path / "artifacts", data_dir, seed=2)
    other.wait_for("failed and queued again", timeout=60)  # grace period passed: retried
    time.sleep(1)
    paused.proc.send_signal(signal.SIGCONT)
    _assert_exact_budget(name, 4, [paused, other])
    assert "this worker's result is dropped" in paused.output


def _terminate_connections(database: str, rounds: int, every: float) -> None:
    engine = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        for _ in range(rounds):
            conn.execute(
                sqlalchemy.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid() AND backend_type = "
                    "'client backend'"
                ),
                {"db": database},
            )
            time.sleep(every)
    engine.dispose()


def _terminate_busy_connections(database: str, kills: int, timeout: float) -> int:
    """Terminate the workers' connections caught in use (a query running, or a transaction
    open: a claim under the study lock, a trial's metrics), until ``kills`` were or
    ``timeout`` passed; returns how many. An idle pooled connection that dies is replaced
    unseen (``pool_pre_ping``): only one lost in use makes a storage call fail."""
    engine = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    busy = sqlalchemy.text(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :db "
        "AND pid <> pg_backend_pid() AND backend_type = 'client backend' AND state <> 'idle'"
    )
    done, deadline = 0, time.monotonic() + timeout
    with engine.connect() as conn:
        while done < kills and time.monotonic() < deadline:
            done += sum(1 for (ok,) in conn.execute(busy, {"db": database}) if ok)
            time.sleep(0.002)
    engine.dispose()
    return done


def test_connections_terminated_repeatedly(tmp_path: Path, data_dir: Path) -> None:
    """Connections cut under a working worker, and under one that is starting (loading the
    study and its config while every connection is cut five times a second). Half the
    trials are anchors, enqueued by ``create``: claims take waiting trials and new ones.

    A claim cut between asking a trial and checking its place in the budget used to ask
    again on its retry: the first trial then ran on in the database, beating from the
    worker's heartbeat, with nobody to train it, and no worker ever finished."""
    name = _create(tmp_path, 6, anchors=3)
    workers = [Worker(PG_URL, name, tmp_path / "artifacts", data_dir, seed=1)]
    _running_trial_of(workers[0], name)
    database = sqlalchemy.engine.make_url(PG_URL).database
    assert database
    assert _terminate_busy_connections(database, kills=3, timeout=60) >= 3
    cutting = threading.Thread(target=_terminate_connections, args=(database, 60, 0.2))
    cutting.start()
    workers.append(Worker(PG_URL, name, tmp_path / "artifacts", data_dir, seed=2))
    cutting.join()
    _assert_exact_budget(name, 6, workers)
    assert any("retrying" in w.output or "heartbeat failed" in w.output for w in workers)


def test_dropped_database_stops_workers_with_the_cause(
    tmp_path: Path, data_dir: Path, scratch_database: tuple[str, Callable[[], None]]
) -> None:
    url, drop = scratch_database
    name = _create(tmp_path, 20, url=url, epochs=3)
    workers = [Worker(url, name, tmp_path / "artifacts", data_dir, seed=s) for s in (1, 2)]
    _running_trial_of_url(workers[0], name, url)
    drop()
    codes = [w.finish(timeout=120) for w in workers]
    for worker, code in zip(workers, codes, strict=True):
        assert code == 2, worker.output
        assert "Traceback" not in worker.output
        last = worker.output.strip().splitlines()[-1]
        assert last.startswith("tauopt worker: error:") and "does not exist" in last, last


def test_the_cause_is_the_innermost_error_that_says_something() -> None:
    """A connection that fails while the pool is invalidated ends its chain in SQLAlchemy's
    bare InvalidatePoolError (it prints "()"): the server's message above it is the cause."""
    server = 'FATAL:  database "gone" does not exist'
    try:
        try:
            try:
                raise sqlalchemy.exc.InvalidatePoolError()
            except sqlalchemy.exc.InvalidatePoolError as marker:
                raise sqlalchemy.exc.OperationalError("connect", {}, Exception(server)) from marker
        except sqlalchemy.exc.OperationalError as e:
            raise optuna.exceptions.StorageInternalError("An exception is raised") from e
    except optuna.exceptions.StorageInternalError as error:
        assert root_message(error) == server
        assert not is_transient(error)


def test_a_name_not_resolved_yet_is_transient_a_wrong_name_is_not() -> None:
    """A host name that does not exist is the user's typo: no wait. The resolver's "temporary
    failure" (EAI_AGAIN) is what a container network answers for a service's name in the
    moment after the container starts (seen under docker compose): it is waited for."""
    engine = sqlalchemy.create_engine("postgresql+psycopg2://u@tauopt-no-such-host.invalid/db")
    with pytest.raises(sqlalchemy.exc.OperationalError) as typo:
        engine.connect()
    assert "could not translate host name" in root_message(typo.value)
    assert not is_transient(typo.value)
    server = 'could not translate host name "db" to address: Temporary failure in name resolution'
    try:
        raise sqlalchemy.exc.OperationalError("connect", {}, Exception(server))
    except sqlalchemy.exc.OperationalError as e:
        assert is_transient(e)


def _running_trial_of_url(worker: Worker, name: str, url: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(t.state == TrialState.RUNNING for t in _trials(name, url)):
            return
        time.sleep(0.1)
    pytest.fail(f"worker never started a trial:\n{worker.output}")


def test_models_that_cannot_be_saved_are_retried(tmp_path: Path, data_dir: Path) -> None:
    """The artifact folder disappears (a file stands in its way) for a while: the trial whose
    model cannot be saved is failed through no fault of its own and queued again."""
    name = _create(tmp_path, 4)
    artifacts = tmp_path / "artifacts"
    worker = Worker(PG_URL, name, artifacts, data_dir, seed=1)
    worker.wait_for("trial 0 complete")
    moved = tmp_path / "artifacts-away"
    artifacts.rename(moved)
    artifacts.write_text("not a folder")  # root ignores permissions; a file blocks everyone
    worker.wait_for("cannot save its model")
    artifacts.unlink()
    moved.rename(artifacts)
    _assert_exact_budget(name, 4, [worker])
    failed = [t for t in _trials(name) if t.state == TrialState.FAIL]
    assert failed and all("cannot save its model" in t.user_attrs["retry_reason"] for t in failed)
