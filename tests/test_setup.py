"""``make setup``'s choice of torch build (tools/install-torch.sh), run as make runs it, with a
pip that records what it is asked to install (the real install is minutes and gigabytes)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from conftest import REPO, free_port

SCRIPT = REPO / "tools" / "install-torch.sh"


def _pip(folder: Path) -> Path:
    """A pip beside a python (the script probes the index with that python), recording its
    arguments, one call a line."""
    folder.mkdir()
    (folder / "python").symlink_to(sys.executable)
    pip = folder / "pip"
    pip.write_text(f'#!/bin/sh\necho "$*" >> {folder / "calls"}\n')
    pip.chmod(0o755)
    return pip


def _run(pip: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    done = subprocess.run(
        ["sh", str(SCRIPT), str(pip)],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    calls = pip.parent / "calls"
    return done, calls.read_text().splitlines() if calls.exists() else []


@contextlib.contextmanager
def _index(root: Path) -> Iterator[str]:
    """A package index on 127.0.0.1 with a torch page."""
    (root / "torch").mkdir(parents=True)
    (root / "torch" / "index.html").write_text("<html></html>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_an_unreachable_cpu_index_falls_back_in_one_line(tmp_path: Path) -> None:
    pip = _pip(tmp_path / "bin")
    nowhere = f"http://127.0.0.1:{free_port()}/whl/cpu"
    done, calls = _run(pip, TORCH="cpu", TORCH_CPU_INDEX=nowhere)
    assert done.returncode == 0, done.stderr  # setup goes on
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and f"torch's CPU index {nowhere} cannot be reached" in lines[0]
    assert "PyPI's torch instead" in lines[0]
    assert calls == []  # torch is left to the project's install


def test_a_reachable_cpu_index_installs_torch_from_it(tmp_path: Path) -> None:
    pip = _pip(tmp_path / "bin")
    with _index(tmp_path / "index") as url:
        done, calls = _run(pip, TORCH="cpu", TORCH_CPU_INDEX=url)
    assert done.returncode == 0, done.stderr
    assert calls == [f"install -q -c constraints.txt --index-url {url} torch torchvision"]
    assert done.stdout.strip() == (
        f"setup: torch's CPU build, from {url} (TORCH=cuda for PyPI's, with CUDA)"
    )


def test_cuda_leaves_torch_to_pypi_and_a_typo_stops(tmp_path: Path) -> None:
    pip = _pip(tmp_path / "bin")
    done, calls = _run(pip, TORCH="cuda")
    assert (done.returncode, done.stdout, calls) == (0, "", [])
    done, calls = _run(pip, TORCH="gpu")
    assert done.returncode == 2 and "TORCH=gpu is no choice: auto, cpu or cuda" in done.stderr


def test_auto_takes_the_cpu_build_where_no_nvidia_gpu_is_seen(tmp_path: Path) -> None:
    pip = _pip(tmp_path / "bin")
    nowhere = f"http://127.0.0.1:{free_port()}/whl/cpu"
    done, _ = _run(pip, TORCH="auto", TORCH_CPU_INDEX=nowhere)
    gpu = Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi")
    if sys.platform != "linux" or gpu:
        assert done.stdout == ""  # PyPI's build, with CUDA where it has it
    else:
        assert "torch's CPU index" in done.stdout  # it tried the CPU build


def test_the_makefile_runs_the_script_with_its_switch() -> None:
    done = subprocess.run(  # -n: print the commands, run none
        ["make", "-n", "-B", "setup", "TORCH=cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    script = "sh tools/install-torch.sh .venv/bin/pip"
    assert f"TORCH=cpu TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu {script}" in done.stdout
