"""Shared fixtures.

Real data comes from ``$TAUOPT_TEST_DATA`` or the checkout's ``../shared/data``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy

from tauopt._cli import main
from tauopt.engine import RawDataset, load_dataset

REPO = Path(__file__).resolve().parent.parent
#: The real PostgreSQL the tests use (CI starts it; see .ci/run).
PG_URL = os.environ.get(
    "TAUOPT_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)


def worker_argv(url: str, study: str, data_dir: Path, artifacts: Path, *extra: str) -> list[str]:
    """``tauopt worker`` as a subprocess command line, on the CPU."""
    return [
        sys.executable,
        "-m",
        "tauopt",
        "worker",
        "--storage",
        url,
        "--study",
        study,
        "--data-dir",
        str(data_dir),
        "--artifact-dir",
        str(artifacts),
        "--device",
        "cpu",
        *extra,
    ]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def together(
    argvs: list[list[str]], cwd: Path, timeout: float = 600
) -> list[subprocess.CompletedProcess[str]]:
    """Run ``tauopt`` with each of ``argvs``, all started at one go signal (each process
    imports tauopt first, then waits for the signal), and collect their output."""
    go = cwd / f"go-{uuid.uuid4().hex[:6]}"
    starter = (
        "import os, sys, time\n"
        "from tauopt._cli import main\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.005)\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", starter, *argv],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for argv in argvs
    ]
    time.sleep(3)
    go.write_text("")
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [
        subprocess.CompletedProcess(p.args, p.returncode, out, "")
        for p, out in zip(procs, outputs, strict=True)
    ]


def _data_dir() -> Path:
    env = os.environ.get("TAUOPT_TEST_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = _data_dir()
    if not (path / "MNIST" / "raw").is_dir():
        pytest.fail(
            f"test data missing: {path}/MNIST/raw; "
            "set TAUOPT_TEST_DATA to a root in torchvision's layout"
        )
    return path


@pytest.fixture(scope="session")
def mnist(data_dir: Path) -> RawDataset:
    return load_dataset("mnist", data_dir, download=False)


@pytest.fixture(scope="session")
def fashion(data_dir: Path) -> RawDataset:
    return load_dataset("fashion-mnist", data_dir, download=False)


RunStudy = Callable[..., int]


@pytest.fixture()
def run_study(data_dir: Path) -> RunStudy:
    """``tauopt run`` in the current directory on a small config file (default small.toml)."""

    def run(n_trials: int, *extra: str, config: str = "small.toml") -> int:
        args = ["run", "--data-dir", str(data_dir), "--config", config, "--n-trials", str(n_trials)]
        return main([*args, *extra])

    return run


@pytest.fixture()
def workdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Path:
    """A fresh working directory with the module's ``SMALL`` study config as small.toml, and
    no storage or artifact folder from the environment."""
    monkeypatch.chdir(tmp_path)
    for name in ("TAUOPT_STORAGE", "TAUOPT_ARTIFACTS"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "small.toml").write_text(request.module.SMALL)
    return tmp_path


@pytest.fixture()
def scratch_database() -> Iterator[tuple[str, Callable[[], None]]]:
    """A PostgreSQL database of its own (nothing of earlier tests in it), and a function that
    drops it under whoever is connected; dropped at the end in any case."""
    name = f"tauopt_scratch_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    url = sqlalchemy.engine.make_url(PG_URL).set(database=name)
    yield url.render_as_string(hide_password=False), drop
    drop()
    admin.dispose()
