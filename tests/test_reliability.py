"""Reliability, round three, each case on the real SQLite or PostgreSQL: big batched claims
beside small ones, special files, interrupted grids, creation races, closed pipes, the
dashboard's door, limits and leftovers."""

from __future__ import annotations

import io
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from conftest import free_port, together, worker_argv

from tauopt._cli import main
from tauopt.storage._artifacts import AtomicFileSystemArtifactStore
from tauopt.study import best_trials, load_study

TINY = """
[study]
min_val_accuracy = 0.0
[search]
arch = "resnet"
depth = 2
width = 8
[trial]
epochs = 1
train_size = 100
val_size = 100
"""


def _tauopt(*args: str, cwd: Path, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tauopt", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        **kw,  # type: ignore[arg-type]
    )


def _run_tiny(
    cwd: Path, data_dir: Path, n: int, *extra: str, config: str = TINY
) -> subprocess.CompletedProcess[str]:
    """``tauopt run`` of ``n`` tiny trials in ``cwd`` (a process of its own)."""
    (cwd / "tiny.toml").write_text(config)
    argv = ["--config", "tiny.toml", "--n-trials", str(n), "--data-dir", str(data_dir), "--quiet"]
    return _tauopt("run", *argv, *extra, cwd=cwd)


def _run_tiny_here(data_dir: Path, n: int) -> int:
    """``tauopt run`` of ``n`` tiny trials in the working directory, in this process."""
    Path("tiny.toml").write_text(TINY)
    argv = ["--config", "tiny.toml", "--n-trials", str(n), "--data-dir", str(data_dir)]
    return main(["run", *argv, "--quiet"])


def _states(url: str, study: str) -> dict[str, int]:
    trials = optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


# -- a big batched claim beside a small one -------------------------------------------------


def test_a_k256_worker_beside_a_k1_worker_drops_almost_nothing(
    tmp_path: Path, data_dir: Path
) -> None:
    """Every trial beats from its claim, and a claim holds the lock about a second at a time:
    the small worker never finds the big one's trials stale."""
    (tmp_path / "tiny.toml").write_text(TINY)
    url = f"sqlite:///{tmp_path / 't.db'}"
    n = 600
    done = _tauopt(
        "create", "--storage", url, "--config", "tiny.toml", "--n-trials", str(n), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    artifacts = tmp_path / "artifacts"
    big = subprocess.Popen(
        [
            *worker_argv(
                url,
                "tauopt",
                data_dir,
                artifacts,
                "--batch-trials",
                "256",
                "--quiet",
                "--threads",
                "1",
            )
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    small = subprocess.Popen(
        [*worker_argv(url, "tauopt", data_dir, artifacts, "--quiet", "--threads", "1")],
        stderr=subprocess.PIPE,
        text=True,
    )
    errs = [p.communicate(timeout=900)[1] for p in (big, small)]
    assert [p.returncode for p in (big, small)] == [0, 0], errs
    assert _states(url, "tauopt") == {"COMPLETE": n}  # the exact budget, nothing left
    dropped = sum(
        int(line.split(" dropped")[0].rsplit(",", 1)[-1])
        for err in errs
        for line in err.splitlines()
        if line.startswith("worker finished") and " dropped" in line
    )
    trainings = n + dropped
    assert dropped <= 0.05 * trainings, errs


# -- special files ----------------------------------------------------------------------------


def test_export_writes_through_special_files_and_refuses_the_rest(
    tmp_path: Path,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert _run_tiny_here(data_dir, 2) == 0
    capsys.readouterr()
    (tmp_path / "real.csv").write_text("old\n")
    (tmp_path / "link.csv").symlink_to("real.csv")
    assert main(["export", "-o", "link.csv"]) == 0
    assert (tmp_path / "link.csv").is_symlink()  # the link stays, its target is the CSV
    assert (tmp_path / "real.csv").read_text().startswith("study,number,state")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE, text=True)
    assert main(["export", "-o", str(fifo)]) == 0
    assert reader.communicate(timeout=30)[0].startswith("study,number,state")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # still a FIFO, not replaced by a file
    done = _tauopt("export", "-o", "/dev/stdout", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.startswith("study,number,state"), done.stderr
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tmp_path / "sock"))
    capsys.readouterr()
    assert main(["export", "-o", "sock"]) == 2
    assert "not a regular file" in capsys.readouterr().err
    assert stat.S_ISSOCK(os.stat(tmp_path / "sock").st_mode)
    listener.close()


def test_a_closed_pipe_ends_quietly(tmp_path: Path, data_dir: Path) -> None:
    done = _run_tiny(tmp_path, data_dir, 2)
    assert done.returncode == 0, done.stderr
    for command in ("export", "best --json"):
        shell = f"{sys.executable} -m tauopt {command} | head -1"
        piped = subprocess.run(shell, shell=True, cwd=tmp_path, capture_output=True, text=True)
        assert piped.returncode == 0 and "Traceback" not in piped.stderr, piped.stderr
        assert "BrokenPipe" not in piped.stderr


# -- the grid and creation --------------------------------------------------------------------


def test_an_interrupted_reproduce_started_again_enqueues_every_run_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'g.db'}"
    argv = [
        sys.executable,
        "-m",
        "tauopt",
        "reproduce",
        "--storage",
        url,
        "--seeds",
        "3",
        "--epochs",
        "1",
        "--train-size",
        "100",
    ]
    first = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    engine = sqlalchemy.create_engine(url)
    deadline = time.monotonic() + 120
    enqueued = 0
    while enqueued < 20 and time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            with engine.connect() as conn:
                enqueued = (
                    conn.execute(sqlalchemy.text("SELECT COUNT(*) FROM trials")).scalar() or 0
                )
        except sqlalchemy.exc.OperationalError:
            continue  # the tables are not there yet
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    engine.dispose()
    assert 20 <= enqueued < 228  # it was stopped in the middle
    again = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    trials = load_study(url, "paper").get_trials(deepcopy=False)
    keys = [t.user_attrs["grid_id"] for t in trials]
    assert len(keys) == len(set(keys)) == 228  # 76 runs per seed, 3 seeds


def _creation_race(url: str, tmp_path: Path, data_dir: Path) -> None:
    (tmp_path / "tiny.toml").write_text(TINY)
    common = ["--storage", url]
    run = [
        "run",
        *common,
        "--config",
        "tiny.toml",
        "--n-trials",
        "2",
        "--quiet",
        "--data-dir",
        str(data_dir),
        "--threads",
        "1",
        "--artifact-dir",
        str(tmp_path / "a"),
    ]
    argvs = (
        [["create", *common, "--config", "tiny.toml", "--n-trials", "2"]] * 4
        + [run] * 3
        + [["reproduce", *common, "--epochs", "1", "--train-size", "100"]] * 4
    )
    done = together(argvs, tmp_path)
    assert [d.returncode for d in done] == [0] * len(argvs), [
        d.stdout for d in done if d.returncode
    ]
    names = optuna.get_all_study_names(url)
    assert sorted(names) == ["paper", "tauopt"]
    assert _states(url, "tauopt") == {"COMPLETE": 2}
    assert len(load_study(url, "paper").get_trials(deepcopy=False)) == 76


def test_creation_races_on_a_fresh_sqlite_file(tmp_path: Path, data_dir: Path) -> None:
    _creation_race(f"sqlite:///{tmp_path / 'fresh.db'}", tmp_path, data_dir)


@pytest.mark.postgres
def test_creation_races_on_an_empty_postgres_database(
    tmp_path: Path, data_dir: Path, scratch_database: tuple[str, Callable[[], None]]
) -> None:
    _creation_race(scratch_database[0], tmp_path, data_dir)


def _reader_waits_for_the_schema(url: str) -> None:
    """A reader that opens while a creator makes the tables (here: the tables are there, the
    version rows not yet, the schema lock held) waits for the lock instead of writing the
    version rows beside the creator; it opens once the creator is done."""
    import threading

    from tauopt.storage import StorageSettings, open_storage
    from tauopt.storage._rdb import _rdb, _schema_lock, normalize_url

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).touch()
    engine = sqlalchemy.create_engine(normalize_url(url), poolclass=sqlalchemy.pool.NullPool)
    optuna.storages._rdb.models.BaseModel.metadata.create_all(engine)
    opened: list[object] = []
    reader = threading.Thread(
        target=lambda: opened.append(open_storage(StorageSettings(url=url), create_schema=False)),
        daemon=True,
    )
    with _schema_lock(url):
        reader.start()
        reader.join(timeout=1.0)
        assert reader.is_alive() and not opened  # it waits for the creator
        assert not sqlalchemy.inspect(engine).has_table("alembic_version")  # wrote nothing
        # the creator's own open, as `tauopt create` makes it under the lock
        _rdb(normalize_url(url), StorageSettings(url=url), {}, create_schema=True)
    reader.join(timeout=60)
    assert len(opened) == 1
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("SELECT COUNT(*) FROM alembic_version")).scalar() == 1
    engine.dispose()


def test_a_reader_waits_while_the_tables_are_made_on_sqlite(tmp_path: Path) -> None:
    _reader_waits_for_the_schema(f"sqlite:///{tmp_path / 'fresh.db'}")


@pytest.mark.postgres
def test_a_reader_waits_while_the_tables_are_made_on_postgres(
    scratch_database: tuple[str, Callable[[], None]],
) -> None:
    _reader_waits_for_the_schema(scratch_database[0])


@pytest.mark.postgres
def test_a_plain_postgresql_url_works(
    scratch_database: tuple[str, Callable[[], None]], tmp_path: Path
) -> None:
    plain = scratch_database[0].replace("postgresql+psycopg2://", "postgresql://")
    (tmp_path / "tiny.toml").write_text(TINY)
    done = _tauopt("create", "--storage", plain, "--config", "tiny.toml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr


# -- answers where a traceback was -------------------------------------------------------------


def test_an_all_infeasible_study_says_why_and_prints_no_failing_snippet(
    tmp_path: Path, data_dir: Path
) -> None:
    strict = TINY.replace("min_val_accuracy = 0.0", "min_val_accuracy = 0.99")
    done = _run_tiny(tmp_path, data_dir, 2, config=strict)
    assert done.returncode == 0, done.stderr
    assert (
        "all 2 completed trials of study 'tauopt' fall below its min_val_accuracy 0.99"
        in done.stdout
    )
    assert "the best reached" in done.stdout
    assert "best_trials(" not in done.stdout  # no snippet that would raise IndexError
    assert best_trials(f"sqlite:///{tmp_path / 'tauopt.db'}", "tauopt").why_empty


def test_broken_model_ids_are_one_line(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert _run_tiny_here(data_dir, 1) == 0
    (best,) = best_trials(None, "tauopt")
    from tauopt.storage import StorageError

    for bad in ("../x", "123", 123, ["x"]):  # the record edited: a number or a list too
        with pytest.raises(StorageError, match="is not one a worker writes"):
            best.__class__(**{**best.__dict__, "artifact_id": bad}).load_model()
    folder = tmp_path / "tauopt-artifacts" / str(best.artifact_id)
    folder.unlink()
    folder.mkdir()  # a folder where the model was
    with pytest.raises(StorageError, match="cannot be read"):
        best.load_model()


# -- limits -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["create", "--n-trials", str(10**20)], "more than a study can run"),
        (["create", "--epochs", str(10**7)], "would not end in a lifetime"),
        (["reproduce", "--seeds", str(10**6)], "at most 100 runs of every setting"),
        (["train", "--epochs", str(10**7)], "epochs must be an integer in [1, 1000000]"),
    ],
)
def test_sizes_that_cannot_finish_are_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "tauopt.db").exists()


def test_too_many_threads_are_warned_about(tmp_path: Path, data_dir: Path) -> None:
    threads = str(4 * (os.cpu_count() or 1))
    done = _run_tiny(tmp_path, data_dir, 1, "--threads", threads)
    assert done.returncode == 0 and f"--threads {threads} is more than" in done.stderr


def test_a_worker_where_nothing_listens_stops_at_once(tmp_path: Path) -> None:
    start = time.monotonic()
    done = _tauopt("worker", "--storage", "postgresql://postgres@127.0.0.1:5999/test", cwd=tmp_path)
    assert done.returncode == 2 and "nothing answers" in done.stderr
    assert time.monotonic() - start < 60  # not the 300 s a restart is waited for


# -- the dashboard's door ---------------------------------------------------------------------


def _request(url: str, *, method: str = "GET", host: str | None = None) -> int:
    request = urllib.request.Request(url, method=method, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_the_dashboard_answers_only_its_own_host_and_read_only_refuses_changes(
    tmp_path: Path, data_dir: Path
) -> None:
    (tmp_path / "tiny.toml").write_text(TINY)
    assert _tauopt("create", "--config", "tiny.toml", cwd=tmp_path).returncode == 0
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tauopt", "dashboard", "--port", str(port), "--read-only"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                if _request(f"{base}/api/meta") == 200:
                    break
            except OSError:
                time.sleep(0.5)
        assert _request(f"{base}/api/studies") == 200
        assert _request(f"{base}/api/studies", host="localhost") == 200
        assert _request(f"{base}/api/studies", host="attacker.example") == 421  # DNS rebinding
        assert _request(f"{base}/api/studies/1", method="DELETE") == 403
        assert optuna.get_all_study_names(f"sqlite:///{tmp_path / 'tauopt.db'}") == ["tauopt"]
        busy = _tauopt("dashboard", "--port", str(port), cwd=tmp_path)
        assert busy.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in busy.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    for argv, message in (
        (["--port", "70000"], "is not a port"),
        (["--host", "no.such.host.invalid"], "cannot be resolved"),
    ):
        done = _tauopt("dashboard", *argv, cwd=tmp_path)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    public = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tauopt",
            "dashboard",
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
        ],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(15)
    public.terminate()
    assert "anyone who reaches this machine" in public.communicate(timeout=30)[1]


# -- leftovers --------------------------------------------------------------------------------


def test_no_lock_file_beside_the_database(tmp_path: Path, data_dir: Path) -> None:
    for study in ("a", "b", "c"):
        done = _run_tiny(tmp_path, data_dir, 1, "--study", study)
        assert done.returncode == 0, done.stderr
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".lock")]


class _FullDisk(io.RawIOBase):
    """A model file that fails half-way, as a full disk does."""

    def __init__(self) -> None:
        self.left = 3

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        self.left -= 1
        if self.left < 0:
            raise OSError(28, "No space left on device")
        buffer[:4] = b"data"
        return 4


def test_a_failed_model_save_leaves_nothing(tmp_path: Path) -> None:
    store = AtomicFileSystemArtifactStore(tmp_path)
    with pytest.raises(OSError, match="No space left"):
        store.write(str(uuid.uuid4()), io.BufferedReader(_FullDisk()))  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
    store.write("whole", io.BytesIO(b"model"))
    assert (tmp_path / "whole").read_bytes() == b"model"
    with pytest.raises(ValueError, match="invalid artifact id"):
        store.write("../escape", io.BytesIO(b"x"))
