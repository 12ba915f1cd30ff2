"""optuna-dashboard serving a study: its API, and the Pareto-front page in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import RunStudy, free_port
from PIL import Image

from tauopt.study._figures import FIGURE_IDS

pytestmark = pytest.mark.browser


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


@pytest.fixture()
def dashboard(
    tmp_path: Path, run_study: RunStudy, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TAUOPT_STORAGE", raising=False)
    (tmp_path / "small.toml").write_text(
        "[study]\nmin_val_accuracy = 0.0\n[trial]\nepochs = 1\ntrain_size = 1000\nval_size = 2000\n"
    )
    assert run_study(6, "--quiet") == 0
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tauopt",
            "dashboard",
            "--storage",
            f"sqlite:///{tmp_path / 'tauopt.db'}",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            _get(f"{base}/api/meta")
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode() if proc.stdout else ""
                proc.kill()
                pytest.fail(f"dashboard did not come up: {out}")
            time.sleep(0.3)
    yield base
    proc.terminate()
    proc.wait(timeout=10)


def test_api_lists_the_study_and_its_trials(dashboard: str) -> None:
    studies = json.loads(_get(f"{dashboard}/api/studies"))["study_summaries"]
    assert [s["study_name"] for s in studies] == ["tauopt"]
    assert studies[0]["directions"] == ["maximize", "minimize"]
    detail = json.loads(_get(f"{dashboard}/api/studies/{studies[0]['study_id']}"))
    assert len(detail["trials"]) == 6
    assert detail["objective_names"] == ["val_accuracy", "active_params"]
    assert detail["best_trials"], "the Pareto front is served"


def test_api_serves_the_study_figures_and_trial_notes(dashboard: str) -> None:
    detail = json.loads(_get(f"{dashboard}/api/studies/1"))
    figures = {g["id"]: json.loads(g["graph_object"]) for g in detail["plotly_graph_objects"]}
    assert set(figures) == set(FIGURE_IDS)
    for figure in figures.values():
        layout = figure["layout"]
        assert layout["title"]["text"]
        assert layout["xaxis"]["title"]["text"] and layout["yaxis"]["title"]["text"]
    accuracy = figures["tauopt-pruning-accuracy"]
    plotted = sum(len(trace["x"]) for trace in accuracy["data"])
    assert plotted == 6  # every complete trial is a point
    notes = [t["note"]["body"] for t in detail["trials"]]
    assert all("**Per epoch**" in n and "train acc" in n and "Pruning:" in n for n in notes)


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("Debian's chromium is needed (apt-get install chromium); .ci/run installs it")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1400,1800",
        "--virtual-time-budget=15000",
    ]
    return subprocess.run(
        [binary, *flags, *args], capture_output=True, text=True, timeout=120, check=True
    )


def test_chromium_shows_the_pareto_front(dashboard: str, tmp_path: Path) -> None:
    page = f"{dashboard}/dashboard/studies/1"
    dom = _chromium("--dump-dom", page, profile=tmp_path / "p1").stdout
    assert "Pareto Front" in dom
    assert "val_accuracy" in dom and "active_params" in dom
    assert dom.count("main-svg") >= 2  # plotly rendered the figures
    for title in (
        "Accuracy against what pruning removed",
        "Step sizes over epochs of the Pareto-optimal trials",
        "Seconds per epoch before and after pruning",
    ):
        assert title in dom, f"the study figure {title!r} is not on the page"
    shot = tmp_path / "dashboard.png"
    _chromium(f"--screenshot={shot}", "--window-size=1400,3000", page, profile=tmp_path / "p2")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 3000)
    # Below Optuna's own cards come the study's figures (about y 1750 to 2650), drawn by plotly
    # on its default plot background, which nothing else on the page uses.
    ours = np.asarray(image.crop((60, 1700, 1380, 2700)), dtype=np.int16)
    background = int((np.abs(ours - np.array([229, 236, 246])).max(axis=2) <= 2).sum())
    assert background > 100_000, f"no plotly figure drawn there ({background} pixels)"
    coloured = int(((ours.max(axis=2) - ours.min(axis=2)) > 80).sum())
    assert coloured > 300, f"the study's figures plotted nothing ({coloured} coloured pixels)"
    # The Pareto-front card is the first on the page: its markers and colour bars are the only
    # saturated pixels in that area (the rest is white, grey text and the blue header above).
    plot = image.crop((400, 150, 1380, 640))
    pixels = np.asarray(plot, dtype=np.int16)
    saturated = int(((pixels.max(axis=2) - pixels.min(axis=2)) > 80).sum())
    assert saturated > 500, f"no plotted points in the Pareto area ({saturated} coloured pixels)"


def test_the_workers_of_a_study_redraw_its_figures_in_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first completed trial of the study draws; a second worker's trial right after does
    not; at their ends only the worker with trials since the last drawing draws again."""
    from tauopt.study import _publisher

    drawn: list[str] = []
    monkeypatch.setattr(_publisher, "view_of", lambda *a, **k: None)
    monkeypatch.setattr(_publisher, "trial_note", lambda view: "")
    monkeypatch.setattr(_publisher, "write_trial_note", lambda *a: None)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    a, b = (_publisher.Publisher(study, None, print) for _ in range(2))  # type: ignore[arg-type]
    for name, worker in (("a", a), ("b", b)):
        monkeypatch.setattr(_publisher, "publish", lambda *args, n=name: drawn.append(n))
        time.sleep(0.01)
        worker.trial(study.ask(), None, feasible=True)  # type: ignore[arg-type]
    assert drawn == ["a"]
    for name, worker in (("b", b), ("a", a)):
        monkeypatch.setattr(_publisher, "publish", lambda *args, n=name: drawn.append(n))
        worker.last()
    assert drawn == ["a", "b"]
