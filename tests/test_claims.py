"""The claim lock and the budget: on SQLite the lock is one for every process whatever its
temporary folder, and a holder stopped inside it loses it after a bounded wait, with a line
that says so; a budget lowered while workers claim ends exact, directly (SQLite and
PostgreSQL) and through the proxy (each new trial checks its place against the budget as
stored now, and the budget changes under the study's lock)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest
from conftest import free_port, worker_argv

from tauopt.errors import ConfigError
from tauopt.storage import StorageSettings, access, open_storage, study_id, study_lock, trial_id
from tauopt.storage._proxy import open_proxy, proxy_server
from tauopt.study import create_study, load_config, parse_config
from tauopt.study._ledger import BUDGET_AT
from tauopt.study._record import CONFIG_ATTR, FAIL_REASON_ATTR

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

_HOLDER = """
import os, signal, sys, time, optuna
from tauopt.storage import study_lock
rdb = optuna.storages.RDBStorage(sys.argv[1])
with study_lock(rdb, "s"):
    print("locked", flush=True)
    if sys.argv[2] == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        time.sleep(float(sys.argv[2]))
"""


def _holder(url: str, how: str, tmp: Path) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, url, how],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


def test_the_sqlite_lock_is_one_whatever_the_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 't.db'}"
    rdb = optuna.storages.RDBStorage(url)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    holder = _holder(url, "3", tmp_path / "a")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "b"))
    monkeypatch.setattr("tempfile.tempdir", None)
    try:
        start = time.monotonic()
        with study_lock(rdb, "s"):
            waited = time.monotonic() - start
    finally:
        holder.wait(timeout=30)
    assert waited > 1.0, waited  # it waited for the holder: one lock, not two
    assert [p.name for p in tmp_path.iterdir() if "lock" in p.name] == []  # nothing left


def test_a_stopped_holder_of_the_sqlite_lock_loses_it_after_a_bounded_wait(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 't.db'}"
    rdb = optuna.storages.RDBStorage(url)
    holder = _holder(url, "stop", tmp_path)
    said: list[str] = []
    try:
        start = time.monotonic()
        with study_lock(rdb, "s", idle_seconds=3, log=said.append):
            waited = time.monotonic() - start
            # the holder, resumed, finds its file replaced and leaves this one alone
            holder.send_signal(signal.SIGCONT)
            assert holder.wait(timeout=30) == 0
            assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".lock")]
    finally:
        holder.kill()
        holder.wait()
    assert 3.0 <= waited < 30, waited
    assert len(said) == 1 and f"process {holder.pid} (stopped)" in said[0], said
    assert "the claim lock of study 's' was held for 3 s" in said[0] and "taken over" in said[0]
    assert [p.name for p in tmp_path.iterdir() if "lock" in p.name] == []


class _Served:
    """A study of ``n`` trials on SQLite, reached directly or through a proxy in this process."""

    def __init__(self, tmp_path: Path, n: int, through_proxy: bool) -> None:
        self.url = f"sqlite:///{tmp_path / 's.db'}"
        self.settings = StorageSettings(url=self.url)
        create_study(self.settings, "s", parse_config({"study": {"n_trials": n, "anchors": 0}}))
        self.server = None
        self.storage: optuna.storages.BaseStorage
        if through_proxy:
            port = free_port()
            self.server = proxy_server(open_storage(self.settings), "127.0.0.1", port)
            self.server.start()
            self.settings = StorageSettings(url=f"grpc://127.0.0.1:{port}")
            self.storage = open_proxy(self.settings.url)
        else:
            self.storage = open_storage(self.settings, create_schema=False)
        self.study = optuna.load_study(study_name="s", storage=self.storage)
        self.access = access(self.storage)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop(None)


@pytest.fixture(params=[False, True], ids=["direct", "proxy"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[_Served]:
    made = _Served(tmp_path, 10, request.param)
    yield made
    made.close()


def test_a_new_trial_is_checked_against_the_budget_as_stored_now(served: _Served) -> None:
    for _ in range(6):
        served.study.ask()
    create_study(served.settings, "s", parse_config({"study": {"n_trials": 6, "anchors": 0}}))
    late = served.study.ask()  # asked by a worker that read the budget as 10
    sid, tid = study_id(served.study), trial_id(late)
    stale = served.access.past_budget(sid, tid, 10, failed_with_attr=FAIL_REASON_ATTR)
    assert not stale  # what a worker's own reading said
    assert served.access.past_budget(
        sid, tid, 10, failed_with_attr=FAIL_REASON_ATTR, budget_at=BUDGET_AT
    )


def test_the_budget_is_never_lowered_below_what_is_used(served: _Served) -> None:
    for _ in range(6):
        served.study.ask()
    with pytest.raises(ConfigError, match="n_trials must be at least 6, got 5"):
        create_study(served.settings, "s", parse_config({"study": {"n_trials": 5, "anchors": 0}}))
    stored = served.storage.get_study_user_attrs(study_id(served.study))
    assert stored[CONFIG_ATTR]["study"]["n_trials"] == 10


def _complete(url: str) -> int:
    trials = optuna.load_study(study_name="tauopt", storage=url).get_trials(deepcopy=False)
    return sum(t.state.name == "COMPLETE" for t in trials)


def _lower_while_they_claim(
    tmp_path: Path, data_dir: Path, storage: str, database: str, env: dict[str, str]
) -> None:
    """Three workers on 60 tiny trials; once 6 are complete, `create` (as the command calls
    it, here in this process) lowers the budget to a few above what is used by then; the
    study ends with exactly that many."""
    (tmp_path / "tiny.toml").write_text(TINY)
    tauopt = [sys.executable, "-m", "tauopt"]
    create = [*tauopt, "create", "--storage", storage, "--config", "tiny.toml"]
    done = subprocess.run([*create, "--n-trials", "60"], cwd=tmp_path, capture_output=True)
    assert done.returncode == 0, done.stderr
    workers = [
        subprocess.Popen(
            worker_argv(storage, "tauopt", data_dir, tmp_path / "a", "--quiet", "--threads", "1"),
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env},
        )
        for _ in range(3)
    ]
    deadline = time.monotonic() + 300
    while _complete(database) < 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    lowered = None
    config = load_config(tmp_path / "tiny.toml")
    for _ in range(20):  # lowered below what is used by the time it runs: refused, higher
        target = _complete(database) + 6
        try:
            create_study(
                StorageSettings(url=storage), "tauopt", config.with_overrides(n_trials=target)
            )
        except ConfigError as e:
            assert "n_trials must be at least" in str(e)
            continue
        lowered = target
        break
    errs = [w.communicate(timeout=600)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], errs
    assert lowered is not None and lowered < 60
    assert _complete(database) == lowered, errs
    states = {
        t.state.name for t in optuna.load_study(study_name="tauopt", storage=database).get_trials()
    }
    assert states <= {"COMPLETE", "FAIL"}  # the failures: new trials past the lowered budget


def test_a_budget_lowered_on_sqlite_with_another_temporary_folder_is_exact(
    tmp_path: Path, data_dir: Path
) -> None:
    (tmp_path / "workers-tmp").mkdir()
    url = f"sqlite:///{tmp_path / 'tauopt.db'}"
    _lower_while_they_claim(tmp_path, data_dir, url, url, {"TMPDIR": str(tmp_path / "workers-tmp")})


@pytest.mark.postgres
def test_a_budget_lowered_directly_on_postgresql_is_exact(
    tmp_path: Path, data_dir: Path, scratch_database: tuple[str, Callable[[], None]]
) -> None:
    database = scratch_database[0]
    _lower_while_they_claim(tmp_path, data_dir, database, database, {})


@pytest.mark.postgres
def test_a_budget_lowered_through_the_proxy_is_exact(
    tmp_path: Path, data_dir: Path, scratch_database: tuple[str, Callable[[], None]]
) -> None:
    database = scratch_database[0]
    port = free_port()
    proxy = subprocess.Popen(
        [sys.executable, "-m", "tauopt", "proxy", "--storage", database, "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proxy.stderr is not None
        while "listening on" not in (line := proxy.stderr.readline()):
            assert line, "the proxy did not start"
        _lower_while_they_claim(tmp_path, data_dir, f"grpc://127.0.0.1:{port}", database, {})
    finally:
        proxy.terminate()
        proxy.wait(timeout=30)
