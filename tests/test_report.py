"""What the study is for: infeasible trials never "best", the papers' grid enqueued once,
and the report's figures and answers rendered from real (small) studies."""

from __future__ import annotations

import csv
import json
import sys
import uuid
from pathlib import Path

import numpy as np
import optuna
import pytest
from conftest import PG_URL, RunStudy, together
from PIL import Image

from tauopt._cli import main
from tauopt.storage import storage_of, study_id
from tauopt.study import best_trials, grid, load_study
from tauopt.study._figures import CURVES_ID
from tauopt.study._record import GRID_POINT_ATTR
from tauopt.study._reproduce import REPRODUCE_ATTR

SMALL = "[trial]\nepochs = 2\ntrain_size = 1000\nval_size = 2000\n"


def _assert_png(path: Path) -> None:
    image = Image.open(path).convert("RGB")
    assert image.size == (1000, 700), path
    pixels = np.asarray(image, dtype=np.int16)
    drawn = int((pixels.sum(axis=2) < 600).sum())  # anything darker than near-white
    assert drawn > 5000, f"{path.name} is (nearly) blank: {drawn} drawn pixels"


def test_trials_below_min_val_accuracy_are_never_best(
    workdir: Path, run_study: RunStudy, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir / "strict.toml").write_text("[study]\nmin_val_accuracy = 0.99\n" + SMALL)
    assert run_study(3, "--quiet", config="strict.toml") == 0
    study = load_study(None, "tauopt")
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    for t in trials:  # stored, and visibly infeasible
        assert t.constraints["min_val_accuracy"] == pytest.approx(
            0.99 - t.user_attrs["val_accuracy"]
        )
        assert t.constraints["min_val_accuracy"] > 0
    best = best_trials(None, "tauopt")
    assert best == [] and "all 3 completed trials" in str(best.why_empty)
    assert "min_val_accuracy 0.99" in str(best.why_empty)
    capsys.readouterr()
    assert main(["best", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main(["export", "-o", "all.csv"]) == 0
    with open(workdir / "all.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["feasible"] for r in rows} == {"False"} and {r["pareto_optimal"] for r in rows} == {
        "False"
    }


def test_search_report_renders(
    workdir: Path, run_study: RunStudy, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_study(6, "--quiet") == 0
    assert main(["report", "--out", "rep"]) == 0
    for name in ("pareto.png", "importance.png"):
        _assert_png(workdir / "rep" / name)
    report = (workdir / "rep" / "report.md").read_text()
    assert "## The front" in report and "cannot say what a setting does" in report
    assert "mean train - test accuracy" in report
    assert "Its first 3 trials were anchors" in report  # placed, not drawn: said so


def test_grid_runs_and_its_report_renders(
    workdir: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["reproduce", "--epochs", "2", "--train-size", "300", "--datasets", "mnist"]
    assert main(argv) == 0
    assert main(argv) == 0  # the same settings again: nothing added
    assert "all 38 runs were enqueued already" in capsys.readouterr().err
    worker = ["worker", "--study", "paper", "--data-dir", str(data_dir), "--quiet"]
    assert main([*worker, "--threads", "2", "--batch-trials", "8"]) == 0
    study = load_study(None, "paper")
    trials = study.get_trials()
    assert len(trials) == len(grid(epochs=2, train_size=300, datasets=("mnist",))) == 38
    assert all(t.state.name == "COMPLETE" for t in trials)
    for t in trials:  # every run's settings are its parameters, its records per epoch
        assert t.params == t.user_attrs[GRID_POINT_ATTR]
        assert len(t.user_attrs["test_accuracy_history"]) == 2
        assert len(t.user_attrs["train_accuracy_history"]) == 2
        assert len(t.user_attrs["clean_loss_history"]) == 2
        assert t.user_attrs["val_accuracy"] is None  # the authors' runs hold nothing out
    assert main(["report", "--study", "paper", "--out", "rep"]) == 0
    for name in ("accuracy.png", "taus.png", "pruning.png", "clean_loss.png"):
        _assert_png(workdir / "rep" / name)
    # the papers' main figure also went to the dashboard
    stored = storage_of(study).get_study_system_attrs(study_id(study))
    assert any(CURVES_ID in key for key in stored)
    report = (workdir / "rep" / "report.md").read_text()
    assert "## Paired differences" in report and "**Scaled down:**" in report
    rows = [r for r in report.splitlines() if r.startswith("| trainable vs fixed taus |")]
    assert any("| resnet | mnist | T=1, " in r and "| 1 (1) |" in r for r in rows), rows
    assert "**One seed:**" in report  # no verdicts from one seed
    assert "nan" not in report
    assert main(["export", "--study", "paper", "-o", "grid.csv"]) == 0
    with open(workdir / "grid.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["config_arch"] for r in rows} == {"resnet", "fracdnn"}
    assert len({r["settings"] for r in rows}) == 38  # every run told apart
    assert main([*argv, "--seeds", "2"]) == 2  # other settings
    assert "holds a grid made with" in capsys.readouterr().err
    # The same grid reported from its export, without the database: the same report.
    assert main(["export", "--study", "paper", "-o", "grid.csv.gz"]) == 0
    assert main(["report", "--trials", "grid.csv.gz", "--out", "from-export"]) == 0
    exported = (workdir / "from-export" / "report.md").read_text()
    assert exported.replace("grid.csv.gz", "study 'paper'") == report
    # A second part (the next seed) in a study of its own: both reported as one grid.
    assert main([*argv, "--first-seed", "1", "--study", "paper-1"]) == 0
    assert main([*worker[:2], "paper-1", *worker[3:], "--threads", "2", "--batch-trials", "8"]) == 0
    assert main(["report", "--study", "paper", "paper-1", "--out", "both"]) == 0
    both = (workdir / "both" / "report.md").read_text()
    assert "76 finished runs of 76" in both and "seeds [0, 1]" in both
    assert "study 'paper', study 'paper-1'" in both
    assert "a seed draws a run's initial weights, the order of its batches" in both
    assert "**One seed:**" not in both and "| 2 (2) |" in both
    capsys.readouterr()
    # A run finished in two sources would count twice in every pair: refused, nothing written.
    assert main(["report", "--trials", "grid.csv.gz", "grid.csv.gz", "--out", "twice"]) == 2
    assert "is finished in both grid.csv.gz and grid.csv.gz" in capsys.readouterr().err
    assert main(["report", "--study", "paper", "paper", "--out", "twice"]) == 2
    assert "finished in both study 'paper' and study 'paper'" in capsys.readouterr().err
    assert not (workdir / "twice").exists()


@pytest.mark.postgres
def test_three_processes_enqueue_the_grid_exactly_once(tmp_path: Path) -> None:
    name = f"grid-{uuid.uuid4().hex[:10]}"
    argv = [sys.executable, "-m", "tauopt", "reproduce", "--storage", PG_URL, "--study", name]
    argv += ["--epochs", "1", "--train-size", "100"]
    done = together([argv[3:]] * 3, tmp_path, timeout=300)
    outputs = [d.stdout for d in done]
    assert [d.returncode for d in done] == [0, 0, 0], outputs
    assert sum("enqueued 76 runs" in o for o in outputs) == 1, outputs
    study = optuna.load_study(study_name=name, storage=PG_URL)
    trials = study.get_trials()
    assert len(trials) == 76 and all(t.state.name == "WAITING" for t in trials)
    points = {json.dumps(t.user_attrs[GRID_POINT_ATTR], sort_keys=True) for t in trials}
    assert len(points) == 76  # every grid point once
    assert study.user_attrs[REPRODUCE_ATTR]["spec"]["runs"] == 76
