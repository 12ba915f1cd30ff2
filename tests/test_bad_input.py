"""Bad input and broken surroundings, as a user meets them through the CLI: one line that names
the thing and the fix, exit status 2, no traceback, no password, nothing created on the way."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import PG_URL, RunStudy

from tauopt._cli import main
from tauopt.errors import DataError
from tauopt.storage import StorageError
from tauopt.study import best_trials

SECRET = "s3cr3t-pw"
SMALL = "[study]\nmin_val_accuracy = 0.0\n[trial]\nepochs = 1\ntrain_size = 500\nval_size = 1000\n"


def _one_line_error(capsys: pytest.CaptureFixture[str], *expected: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and SECRET not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def _with_password(url: str) -> str:
    return url.replace("postgres@", f"postgres:{SECRET}@")


UNREACHABLE = f"postgresql+psycopg2://postgres:{SECRET}@127.0.0.1:5999/test"
MISSING_DB = _with_password(PG_URL).rsplit("/", 1)[0] + "/tauopt_no_such_database"


@pytest.mark.postgres
@pytest.mark.parametrize("command", ["worker", "best", "export", "dashboard"])
@pytest.mark.parametrize(
    ("url", "message"),
    [
        (UNREACHABLE, "Connection refused"),
        (MISSING_DB, 'database "tauopt_no_such_database" does not exist'),
        ("sqlite:///never-created.db", "no SQLite database at"),
    ],
    ids=["unreachable", "missing-database", "sqlite-never-created"],
)
def test_storage_problems_are_one_line(
    workdir: Path, capsys: pytest.CaptureFixture[str], command: str, url: str, message: str
) -> None:
    extra = ["--storage-retry-seconds", "1"] if command == "worker" else []
    assert main([command, "--storage", url, *extra]) == 2
    _one_line_error(capsys, message)
    assert list(workdir.iterdir()) == [workdir / "small.toml"]  # no .db, no artifact folder


@pytest.mark.postgres
def test_run_masks_the_password_in_its_summary(
    workdir: Path,
    data_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = _with_password(PG_URL)  # trust authentication here: any password is accepted
    study = f"mask-{os.getpid()}-{workdir.name[-6:]}"
    argv = ["run", "--storage", url, "--study", study, "--config", "small.toml", "--n-trials", "1"]
    assert main([*argv, "--data-dir", str(data_dir), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert SECRET not in out + err
    assert "postgres:***@" in out and "password is masked" in out
    # read from another folder, a PostgreSQL study's model is not found (and says where to
    # look), and no empty ./tauopt-artifacts is left there
    reader = workdir / "reader"
    reader.mkdir()
    monkeypatch.chdir(reader)
    with pytest.raises(StorageError, match=r"no artifact directory .*--artifact-dir"):
        best_trials(url, study)[0].load_model()
    assert list(reader.iterdir()) == []


def test_broken_model_artifacts_are_named(
    workdir: Path, run_study: RunStudy, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_study(1, "--quiet") == 0
    (trial,) = best_trials(None, "tauopt")
    stored = workdir / "tauopt-artifacts" / str(trial.artifact_id)
    good = stored.read_bytes()
    with pytest.raises(StorageError, match="pass the artifact directory the workers used"):
        best_trials(None, "tauopt", artifact_dir=workdir)[0].load_model()  # the wrong folder
    for damaged in (good[: len(good) // 2], b""):
        stored.write_bytes(damaged)
        with pytest.raises(StorageError, match="is damaged or not a model file"):
            trial.load_model()
    stored.unlink()
    with pytest.raises(StorageError, match=f"model of trial {trial.number} not found"):
        trial.load_model()


def test_artifact_dir_that_cannot_be_written_stops_the_worker_at_start(
    workdir: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["create", "--config", "small.toml", "--n-trials", "1"]) == 0
    blocked = workdir / "models"
    blocked.write_text("a file where the folder should be")
    argv = ["worker", "--data-dir", str(data_dir), "--artifact-dir", str(blocked)]
    assert main(argv) == 2
    _one_line_error(capsys, f"cannot write trained models to {blocked}", "--artifact-dir")


def test_export_to_paths_that_cannot_be_written(
    workdir: Path, run_study: RunStudy, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_study(1, "--quiet") == 0
    capsys.readouterr()
    (workdir / "a-folder").mkdir()
    for target in ("missing-dir/trials.csv", "a-folder", "/proc/trials.csv"):
        assert main(["export", "-o", target]) == 2
        _one_line_error(capsys, "cannot write", "-o")
    assert sorted(p.name for p in workdir.iterdir() if p.name.startswith(".")) == []


def test_sqlite_path_whose_folder_cannot_be_made(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (workdir / "file").write_text("")
    assert main(["create", "--storage", f"sqlite:///{workdir}/file/sub/t.db"]) == 2
    _one_line_error(capsys, "cannot create the folder of the SQLite file")


def test_study_name_longer_than_the_database_column(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["create", "--study", "x" * 600])
    assert done.value.code == 2
    assert "at most 512 characters, got 600" in capsys.readouterr().err
    assert not (workdir / "tauopt.db").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "meta"], "device 'meta' is not supported"),
        (["--device", "mps"], "device 'mps' is not supported"),
        (["--width", "100000"], "width 100000 and depth 6 need about"),
    ],
)
def test_devices_and_sizes_that_cannot_train(
    data_dir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(["train", "--data-dir", str(data_dir), "--train-size", "100", *argv]) == 2
    _one_line_error(capsys, message)


def _dataset_copy(data_dir: Path, into: Path) -> Path:
    raw = into / "MNIST" / "raw"
    shutil.copytree(data_dir / "MNIST" / "raw", raw)
    return raw


def _write_idx(path: Path, data: torch.Tensor) -> None:
    header = bytes([0, 0, 8, data.ndim]) + b"".join(d.to_bytes(4, "big") for d in data.shape)
    path.write_bytes(gzip.compress(header + data.numpy().tobytes()))


def test_labels_outside_the_classes_are_refused(tmp_path: Path, data_dir: Path) -> None:
    raw = _dataset_copy(data_dir, tmp_path)
    labels = torch.zeros(10_000, dtype=torch.uint8)
    labels[5] = 12
    _write_idx(raw / "t10k-labels-idx1-ubyte.gz", labels)
    from tauopt.engine import load_dataset

    with pytest.raises(DataError, match="test labels run from 0 to 12, outside the 10 classes"):
        load_dataset("mnist", tmp_path, download=False)


def test_test_images_of_another_shape_are_refused(tmp_path: Path, data_dir: Path) -> None:
    raw = _dataset_copy(data_dir, tmp_path)
    _write_idx(raw / "t10k-images-idx3-ubyte.gz", torch.zeros(10_000, 32, 32, dtype=torch.uint8))
    from tauopt.engine import load_dataset

    with pytest.raises(DataError, match="training images have 784 features, test images 1024"):
        load_dataset("mnist", tmp_path, download=False)
