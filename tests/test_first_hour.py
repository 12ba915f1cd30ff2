"""A new user's first hour, through the CLI as they type it: their own small dataset without a
config file, the commands a run prints for what comes next, ``train --threads``."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from tauopt._cli import main
from tauopt.engine import default_val_size
from tauopt.study import load_config, load_study
from tauopt.study._config import PARAMS, TrialBudget
from tauopt.study._record import CONFIG_ATTR


def _digits(path: Path) -> Path:
    """scikit-learn's digits in a 3:1 split: 1,347 training and 450 test images of 8 x 8."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = (digits.images / 16).astype(np.float32), digits.target.astype(np.int64)
    np.savez(path, x_train=x[:1347], y_train=y[:1347], x_test=x[1347:], y_test=y[1347:])
    return path


@pytest.fixture()
def digits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in ("TAUOPT_STORAGE", "TAUOPT_ARTIFACTS", "TAUOPT_DATA"):
        monkeypatch.delenv(name, raising=False)
    return _digits(tmp_path / "digits.npz")


def _stored(study: str = "tauopt") -> dict[str, object]:
    config: dict[str, object] = load_study(None, study).user_attrs[CONFIG_ATTR]["trial"]
    return config


def test_the_default_validation_size_is_a_fifth_at_most_ten_thousand() -> None:
    assert default_val_size(60_000) == 10_000  # MNIST: the papers' hold-out
    assert default_val_size(50_000) == 10_000  # CIFAR
    assert default_val_size(1_347) == 269  # digits: 1347 // 5
    assert default_val_size(3) == 1  # at least one


def test_train_on_a_small_file_needs_no_validation_flag(
    digits: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--dataset", "digits.npz", "--epochs", "1", "--threads", "1", "--json"]
    assert main([*argv, "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["val_size"] == 269  # a fifth of 1,347
    assert main([*argv, "--val-size", "300", "--train-size", "500", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["val_size"] == 300 and out["config"]["train_size"] == 500


def test_train_threads_is_checked_and_warns_past_the_cores(
    digits: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--threads", "0"])
    assert "--threads: must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--threads", "100000"])  # OpenMP would crash the process
    assert "--threads: at most 1024, got '100000'" in capsys.readouterr().err
    more = (os.cpu_count() or 1) + 1
    argv = ["train", "--dataset", "digits.npz", "--epochs", "1", "--device", "cpu"]
    assert main([*argv, "--threads", str(more)]) == 0
    assert f"--threads {more} is more than this machine's" in capsys.readouterr().err


def test_create_and_run_take_the_trial_settings_and_fit_small_data(
    digits: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["create", "--dataset", "digits.npz"]) == 0
    assert "(1,078 training, 269 validation images)" in capsys.readouterr().err
    stored = _stored()
    assert stored["val_size"] == 269 and stored["train_size"] == 1078  # all that is left
    argv = ["run", "--study", "set", "--dataset", "digits.npz", "--n-trials", "1"]
    flags = ["--val-size", "300", "--train-size", "500", "--epochs", "1", "--quiet"]
    assert main([*argv, *flags, "--device", "cpu"]) == 0
    assert "(500 training, 300 validation images)" in capsys.readouterr().err
    stored = _stored("set")
    assert (stored["val_size"], stored["train_size"], stored["epochs"]) == (300, 500, 1)


def test_run_normalize_is_stored_and_trains_raw_pixels(
    digits: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pixels 0-16, as scikit-learn gives them: `run --normalize` stores the setting, so that
    every worker standardises the inputs, and the trial trains."""
    with np.load(digits) as arrays:
        np.savez("raw.npz", **{k: v * 16 if k.startswith("x") else v for k, v in arrays.items()})
    argv = ["run", "--dataset", "raw.npz", "--normalize", "--epochs", "1", "--n-trials", "1"]
    assert main([*argv, "--quiet", "--device", "cpu", "--threads", "1"]) == 0
    assert "(1 complete, 0 pruned, 0 failed)" in capsys.readouterr().err
    assert _stored()["normalize"] is True
    assert main([*argv, "--quiet", "--device", "cpu", "--threads", "1"]) == 0
    more = _printed(capsys.readouterr().out, "To add trials:")
    assert "--normalize" in more  # a switch, carried as one word
    assert main(more) == 0  # the same config: the budget raised, nothing refused
    assert "(1 complete, 0 pruned, 0 failed)" in capsys.readouterr().err


def test_too_large_a_validation_size_says_which_flag(
    digits: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "--dataset", "digits.npz", "--val-size", "2000", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "val_size must lie in [0, 1347), got 2,000; lower --val-size" in err
    assert sorted(p.name for p in digits.parent.iterdir()) == ["digits.npz"]  # nothing made


def _printed(out: str, after: str) -> list[str]:
    """The command printed on the line after ``after``, as argv for main()."""
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.endswith(after))
    words = shlex.split(lines[at + 1])  # `python -m tauopt run ...` under pytest
    return words[words.index("run") :]


def test_the_printed_commands_carry_the_runs_settings_and_work(
    digits: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`TAUOPT_DATA=... tauopt run ...` twice: the second says how to add trials, with the
    data root (set for one command only) and every setting the run was given."""
    data = tmp_path / "data"
    data.mkdir()
    digits.rename(data / "digits.npz")
    argv = ["run", "--dataset", "digits.npz", "--epochs", "10", "--n-trials", "1", "--quiet"]
    monkeypatch.setenv("TAUOPT_DATA", str(data))
    assert main([*argv, "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main([*argv, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    # the models' input and output, from the study's data
    assert "logits (N, 10) of images (N, 8, 8) or rows (N, 64)" in out
    more = _printed(out, "To add trials:")
    assert more[more.index("--data-dir") + 1] == str(data)
    assert more[more.index("--n-trials") + 1] == "2"
    assert more[more.index("--dataset") + 1] == "digits.npz" and "--epochs" in more
    fresh = _printed(out, "to start a new study:")
    assert fresh[fresh.index("--study") + 1] == "tauopt-2"

    monkeypatch.delenv("TAUOPT_DATA")  # another shell: the printed command alone
    assert main(more) == 0
    assert "worker finished: 1 trials here (1 complete" in capsys.readouterr().err
    assert load_study(None, "tauopt").user_attrs[CONFIG_ATTR]["study"]["n_trials"] == 2


def _offline(name: str, folder: Path) -> None:
    from tauopt.errors import DataError

    raise DataError(f"the {name} files are not under {folder} and downloading them failed")


def test_a_run_that_cannot_find_its_data_changes_nothing(
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("TAUOPT_STORAGE", "TAUOPT_ARTIFACTS", "TAUOPT_DATA"):
        monkeypatch.delenv(name, raising=False)
    small = ["--epochs", "1", "--train-size", "200", "--val-size", "200", "--quiet"]
    argv = ["run", "--n-trials", "1", *small, "--device", "cpu"]
    assert main([*argv, "--data-dir", str(data_dir)]) == 0
    monkeypatch.setattr("tauopt.engine._data.download", _offline)
    capsys.readouterr()
    # the budget raised without the data root, offline: refused before the budget changes
    assert main(["run", "--n-trials", "3", *small, "--device", "cpu"]) == 2
    assert "the mnist files are not under" in capsys.readouterr().err
    assert load_study(None, "tauopt").user_attrs[CONFIG_ATTR]["study"]["n_trials"] == 1
    # a run that does not match its study is told so, not sent looking for data it lacks
    _digits(tmp_path / "digits.npz")
    assert main(["run", "--study", "d", "--dataset", "digits.npz", "--n-trials", "1", *small]) == 0
    capsys.readouterr()
    assert main(["run", "--study", "d", "--n-trials", "3", *small]) == 2
    err = capsys.readouterr().err
    assert "already exists with another configuration" in err and "trial.dataset" in err
    assert load_study(None, "d").user_attrs[CONFIG_ATTR]["study"]["n_trials"] == 1


def test_reproduce_prints_a_worker_command_that_finds_the_data(
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`TAUOPT_DATA=... tauopt reproduce`: the worker command it prints carries the data root
    and works in a shell without it, offline."""
    monkeypatch.chdir(tmp_path)
    for name in ("TAUOPT_STORAGE", "TAUOPT_ARTIFACTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TAUOPT_DATA", str(data_dir))
    argv = ["reproduce", "--epochs", "1", "--train-size", "100", "--datasets", "mnist"]
    assert main([*argv, "--only", "fixed-vs-trainable"]) == 0
    printed = re.search(r"run them with `([^`]*)`", capsys.readouterr().err)
    assert printed is not None
    words = shlex.split(printed.group(1))
    worker = words[words.index("worker") :]
    assert worker[worker.index("--data-dir") + 1] == str(data_dir)
    monkeypatch.delenv("TAUOPT_DATA")  # another shell: the printed command alone
    monkeypatch.setattr("tauopt.engine._data.download", _offline)
    assert main([*worker, "--quiet", "--threads", "1", "--batch-trials", "8"]) == 0
    assert re.search(r"worker finished: (\d+) trials here \(\1 complete", capsys.readouterr().err)


def test_every_config_key_is_in_the_docs_and_both_configs_load() -> None:
    page = (REPO / "docs" / "config.md").read_text()
    listed = set(re.findall(r"^\| `(\w+)` \|", page, flags=re.MULTILINE))
    study = {"objective", "n_trials", "min_val_accuracy", "stop_trials", "anchors"}
    trial = {f.name for f in dataclasses.fields(TrialBudget)} - {"dataset_sha256"}  # create's
    keys = study | set(PARAMS) | trial | {"heartbeat_interval", "grace_period"}
    assert keys <= listed, sorted(keys - listed)
    for name in ("tour.toml", "study.toml"):
        assert load_config(REPO / "configs" / name).objective == "pareto"
        assert "docs/config.md" in (REPO / "configs" / name).read_text()


def test_every_export_column_is_in_the_docs(
    digits: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", "--dataset", "digits.npz", "--epochs", "1", "--n-trials", "1", "--quiet"]
    assert main([*argv, "--device", "cpu"]) == 0
    assert main(["export", "-o", "all.csv"]) == 0
    with open("all.csv") as fh:
        header = next(csv.reader(fh))
    page = (REPO / "docs" / "config.md").read_text().split("## What `tauopt export` writes")[1]
    for column in header:
        family = column.split("_")[0] + "_*" if column.startswith(("param_", "value_")) else None
        named = f"`{column}`" in page or (family is not None and f"`{family}`" in page)
        assert named or f"`{column.removeprefix('config_')}`" in page, column
