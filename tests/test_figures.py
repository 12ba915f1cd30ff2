"""The figures as a reader meets them, at the smallest budget (one epoch): the report's PNGs
(titles and ticks that do not collide, a marker where a line has one point), its tables
(an empty or all-zero one says why), and the dashboard (infeasible trials greyed in
Optuna's own Pareto plot, a colour per trial, no bookkeeping among the study's attributes)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import subprocess
import sys
import time
import urllib.request
import wsgiref.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna_dashboard
import pytest
from conftest import free_port
from matplotlib.figure import Figure
from PIL import Image

from tauopt._cli import main
from tauopt._dashboard import hide_study_attrs
from tauopt.engine import PruneEvent
from tauopt.storage import StorageSettings, open_storage, storage_of, study_id
from tauopt.study import _plots, load_study
from tauopt.study._figures import (
    epoch_seconds,
    learning_curves,
    pruning_accuracy,
    taus_over_epochs,
)
from tauopt.study._record import (
    CONFIG_ATTR,
    FIGURES_AT_ATTR,
    INTERNAL_STUDY_ATTRS,
)
from tauopt.study._views import trial_views


@pytest.fixture()
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in ("TAUOPT_STORAGE", "TAUOPT_ARTIFACTS", "TAUOPT_DATA"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def _overlap(a: Any, b: Any) -> bool:
    return bool(a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1)


def _check_figure(fig: Figure, name: str) -> None:
    """What a reader sees: text that does not collide, and every line visible."""
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    titles = [ax.title for ax in fig.axes if ax.get_visible() and ax.get_title()]
    titles += [t for t in fig.texts if t.get_text()]  # the suptitle
    boxes = [t.get_window_extent(renderer) for t in titles]
    for i, a in enumerate(boxes):
        assert a.x0 >= 0 and a.x1 <= fig.bbox.width, f"{name}: {titles[i].get_text()!r} is cut"
        for j in range(i + 1, len(boxes)):
            assert not _overlap(a, boxes[j]), (
                f"{name}: {titles[i].get_text()!r} and {titles[j].get_text()!r} collide"
            )
    for ax in fig.axes:
        labels = [*ax.get_xticklabels(), *ax.get_yticklabels(), *ax.get_yticklabels(minor=True)]
        for label in labels:
            assert "times" not in label.get_text(), f"{name}: tick {label.get_text()!r}"
        shown = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        if ax.get_xlabel() == "epoch":
            assert all(float(t.replace("\u2212", "-")).is_integer() for t in shown), (name, shown)
        for line in ax.get_lines():
            if len(line.get_xdata()) == 1 and line.get_label() != "_nolegend_":
                assert line.get_marker() not in (None, "None", ""), (
                    f"{name}: {line.get_label()!r} is one point without a marker"
                )


def test_the_report_at_one_epoch_reads_well(
    here: Path,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seen: list[str] = []
    suptitles: list[str] = []
    save = _plots._save

    def checked(fig: Figure, path: Path) -> Path:
        _check_figure(fig, path.name)
        seen.append(path.name)
        suptitles.extend(t.get_text() for t in fig.texts)
        return save(fig, path)

    monkeypatch.setattr(_plots, "_save", checked)
    argv = ["reproduce", "--epochs", "1", "--train-size", "100", "--datasets", "mnist"]
    assert main([*argv, "--only", "fixed-vs-trainable"]) == 0
    worker = ["worker", "--study", "paper", "--data-dir", str(data_dir), "--device", "cpu"]
    assert main([*worker, "--quiet", "--batch-trials", "8", "--threads", "1"]) == 0
    assert main(["report", "--study", "paper", "--out", "rep"]) == 0
    assert sorted(seen) == ["accuracy.png", "clean_loss.png", "taus.png"]
    for name in seen:
        assert Image.open(here / "rep" / name).size == (1000, 700)
    report = (here / "rep" / "report.md").read_text()
    soon = report.split("### Epochs to")[1].split("###")[0]
    assert "Every difference is 0" in soon and "With one epoch a run" in soon
    blocks = report.split("### Blocks removed by pruning")[1].split("##")[0]
    assert "No row: no pair of runs here has pruning on" in blocks and "|---" not in blocks
    # one dataset ran: worded so, not "both datasets"
    assert "both datasets" not in report and not any("both" in t for t in suptitles)
    assert "mean over runs of mnist:" in report and "T, mnist only (descriptive)" in report
    assert any(t.endswith("no pruning, mnist") for t in suptitles)
    # the dashboard's copy of the papers' figure: one epoch drawn as points, not as nothing
    views = trial_views(load_study(None, "paper"))
    curves = learning_curves(views)
    assert curves.data and all(
        len(trace.x) == 1 and "markers" in trace.mode for trace in curves.data
    )
    # figures with nothing to draw say why (no validation images; nothing pruned in 1 epoch)
    for figure, why in (
        (pruning_accuracy(views), "hold out no validation images"),
        (epoch_seconds(views), "no trial has removed a block yet"),
    ):
        assert any(why in a.text for a in figure.layout.annotations), why


def _study(here: Path, data_dir: Path, min_val_accuracy: float, trials: int = 2) -> None:
    (here / "tiny.toml").write_text(
        f"[study]\nmin_val_accuracy = {min_val_accuracy}\n"
        "[trial]\nepochs = 1\ntrain_size = 500\nval_size = 500\n"
    )
    argv = ["run", "--config", "tiny.toml", "--n-trials", str(trials), "--quiet"]
    assert main([*argv, "--data-dir", str(data_dir), "--device", "cpu", "--threads", "1"]) == 0


def _pareto_reads_well(fig: Figure, floor: float) -> None:
    """A legend entry only for what is drawn; infeasible trials grey; with none feasible, no
    front and a note that says why, clear of the legend."""
    (ax,) = fig.axes
    labels = ax.get_legend_handles_labels()[1]
    drawn = {c.get_label(): c for c in ax.collections}
    assert set(labels) - {"Pareto front"} == set(drawn)
    notes = [t for t in ax.texts if "no feasible trial yet" in t.get_text()]
    if floor == 0.0:
        assert "Pareto front" in labels and not notes
        return
    grey = drawn[f"infeasible: below min_val_accuracy = {floor:g}"]
    assert len(grey.get_offsets()) == 2  # both trials, greyed
    assert all(r == g == b for r, g, b, _ in grey.get_facecolor())
    assert "Pareto front" not in labels and not ax.get_lines()
    (note,) = notes
    assert f"every trial is below min_val_accuracy = {floor:g}" in note.get_text()
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    box = note.get_bbox_patch().get_window_extent(renderer)
    assert not _overlap(box, ax.get_legend().get_window_extent(renderer))
    assert ax.bbox.x0 < box.x0 and box.x1 < ax.bbox.x1  # not cut


@pytest.mark.parametrize("floor", [0.0, 0.99])
def test_the_search_report_at_two_trials_reads_well(
    here: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, floor: float
) -> None:
    """Two one-epoch trials, every one feasible (floor 0) or none (floor 0.99: a short run
    under a study's floor)."""
    seen: list[str] = []
    save = _plots._save

    def checked(fig: Figure, path: Path) -> Path:
        _check_figure(fig, path.name)
        seen.append(path.name)
        if path.name == "pareto.png":
            _pareto_reads_well(fig, floor)
        return save(fig, path)

    monkeypatch.setattr(_plots, "_save", checked)
    _study(here, data_dir, min_val_accuracy=floor, trials=2)
    assert main(["report", "--out", "rep"]) == 0
    assert sorted(seen) == ["importance.png", "pareto.png"]
    report = (here / "rep" / "report.md").read_text()
    why = f"No trial is feasible yet: every one is below the study's min_val_accuracy = {floor:g}"
    assert (why in report) == (floor > 0)


def test_infeasible_trials_carry_the_constraint_optuna_dashboard_reads(
    here: Path, data_dir: Path
) -> None:
    _study(here, data_dir, min_val_accuracy=0.99)
    study = load_study(None, "tauopt")
    for trial in study.get_trials():
        margin = trial.constraints["min_val_accuracy"]
        assert margin > 0  # nothing reaches 0.99 in one epoch
        # optuna-dashboard reads the list (its Pareto plot greys a trial with one above 0)
        assert trial.system_attrs["constraints"] == [margin]


def test_the_dashboard_hides_bookkeeping_but_not_the_config(here: Path, data_dir: Path) -> None:
    _study(here, data_dir, min_val_accuracy=0.0)
    study = load_study(None, "tauopt")
    assert FIGURES_AT_ATTR in study.user_attrs  # the workers' stamp is there
    storage = open_storage(StorageSettings(url=f"sqlite:///{here / 'tauopt.db'}"))
    hide_study_attrs(storage, INTERNAL_STUDY_ATTRS)
    app = optuna_dashboard.wsgi(storage)
    for path in ("/api/studies", f"/api/studies/{study_id(study)}"):
        environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
        wsgiref.util.setup_testing_defaults(environ)
        body = json.loads(b"".join(app(environ, lambda *response: None)))
        shown = body["study_summaries"][0] if "study_summaries" in body else body
        keys = {a["key"] for a in shown["user_attrs"]}
        assert keys == {CONFIG_ATTR}, (path, keys)
    # every other reader still sees it
    assert FIGURES_AT_ATTR in storage_of(load_study(None, "tauopt")).get_study_user_attrs(
        study_id(study)
    )


def test_every_trial_has_its_own_colour(here: Path, data_dir: Path) -> None:
    _study(here, data_dir, min_val_accuracy=0.0, trials=3)
    views = trial_views(load_study(None, "tauopt"))
    # twelve trials drawn, as many as the figures draw: the front and the pruned alike
    many = [dataclasses.replace(views[i % len(views)], number=i, pareto=True) for i in range(12)]
    figure = taus_over_epochs(many)
    colour = {}
    for trace in figure.data:
        if trace.legendgroup != "blocks":
            colour.setdefault(trace.legendgroup, set()).add(trace.line.color)
    assert len(colour) == 12 and all(len(c) == 1 for c in colour.values())
    assert len({next(iter(c)) for c in colour.values()}) == 12  # none reused
    event = [PruneEvent(epoch=1, position=1, block=1)]  # where a trial kept every block
    pruned = [
        v
        if v.record.history.pruned
        else dataclasses.replace(
            v,
            record=dataclasses.replace(
                v.record, history=dataclasses.replace(v.record.history, pruned=event)
            ),
        )
        for v in many
    ]
    seconds = epoch_seconds(pruned)
    assert len({t.line.color for t in seconds.data}) == len(seconds.data) == 12


def _chromium(*args: str, profile: Path) -> None:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("Debian's chromium is needed (apt-get install chromium); .ci/run installs it")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    subprocess.run(
        [binary, *flags, f"--user-data-dir={profile}", "--virtual-time-budget=15000", *args],
        capture_output=True,
        timeout=120,
        check=True,
    )


@contextlib.contextmanager
def _dashboard() -> Iterator[str]:
    """``tauopt dashboard`` on the study in the working directory."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tauopt", "dashboard", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/meta", timeout=5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("the dashboard did not come up")
            time.sleep(0.3)
    try:
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.browser
def test_optunas_pareto_plot_greys_infeasible_trials(here: Path, data_dir: Path) -> None:
    _study(here, data_dir, min_val_accuracy=0.99, trials=3)  # every trial infeasible
    shot = here / "page.png"
    with _dashboard() as base:
        page = f"{base}/dashboard/studies/1"
        _chromium(f"--screenshot={shot}", "--window-size=1400,1000", page, profile=here / "p")
    # The Pareto-front card is the first on the page; its plot area lies left of the colour
    # bars. Feasible trials are coloured by number (blue); infeasible ones light grey.
    area = np.asarray(Image.open(shot).convert("RGB").crop((400, 150, 1090, 640)), np.int16)
    saturated = int(((area.max(axis=2) - area.min(axis=2)) > 80).sum())
    grey = int((np.abs(area - 204).max(axis=2) <= 6).sum())  # #cccccc
    assert grey >= 10, f"no grey markers ({grey} pixels)"  # one marker is ~25 (they overlap)
    assert saturated < 30, f"infeasible trials drawn in colour ({saturated} pixels)"
