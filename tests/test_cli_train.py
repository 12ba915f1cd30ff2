"""``tauopt train`` called as a user would, through main(argv)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tauopt._cli import main


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_train_json_has_every_metric(
    data_dir: Path, capsys: pytest.CaptureFixture[str], precision: str
) -> None:
    code = main(
        [
            "train",
            "--data-dir",
            str(data_dir),
            "--epochs",
            "2",
            "--train-size",
            "500",
            "--val-size",
            "1000",
            "--prune-eps",
            "0.2",
            "--l1",
            "0.5",
            "--lr",
            "0.1",
            "--device",
            "cpu",
            "--precision",
            precision,
            "--json",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    out = json.loads(captured.out)
    assert out["config"]["precision"] == precision
    for key in (
        "val_accuracy",
        "test_accuracy",
        "taus",
        "tau_history",
        "active_blocks",
        "pruned",
        "epoch_seconds",
    ):
        assert key in out
    assert len(out["val_accuracy"]) == 2 and len(out["epoch_seconds"]) == 2
    assert out["active_blocks"] == len(out["taus"])
    assert "epoch 2/2" in captured.err  # progress on stderr, JSON alone on stdout


def test_train_fracdnn_fashion_human_output(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "train",
            "--arch",
            "fracdnn",
            "--dataset",
            "fashion-mnist",
            "--data-dir",
            str(data_dir),
            "--epochs",
            "1",
            "--train-size",
            "300",
            "--val-size",
            "500",
            "--gamma",
            "0.7",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    assert "test accuracy" in capsys.readouterr().out


def test_train_without_validation_prints_the_test_accuracy(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--data-dir", str(data_dir), "--epochs", "1", "--train-size", "200", "--val-size", "0"]
    assert main(["train", *argv, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("test accuracy ") and "validation" not in out
    assert main(["train", *argv, "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["val_accuracy"] == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--arch", "fracdnn", "--prune-eps", "0.1"], "prune_eps applies to arch 'resnet' only"),
        (["--epochs", "0"], "epochs must be an integer in [1, 1000000]"),
        (["--data-seed", "-1"], "data_seed must be an integer >= 0"),
        (["--device", "tpu"], "unknown device"),
    ],
)
def test_bad_input_is_one_clear_line(
    data_dir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code = main(["train", "--data-dir", str(data_dir), "--train-size", "100", *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_unknown_precision_is_a_usage_error(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:  # argparse's usage error
        main(["train", "--data-dir", str(data_dir), "--precision", "float16"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "--precision: invalid choice: 'float16'" in err and "bfloat16" in err


def test_missing_data_dir_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Offline: the download fails, and the error says where to put the files.
    monkeypatch.setattr("tauopt.engine._data.download", _offline)
    code = main(["train", "--data-dir", str(tmp_path), "--epochs", "1"])
    assert code == 2
    assert str(tmp_path / "MNIST" / "raw") in capsys.readouterr().err


def _offline(name: str, folder: Path) -> None:
    from tauopt.errors import DataError

    raise DataError(f"the {name} files are not under {folder} and downloading them failed")


def test_help_shows_defaults_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("tauopt 0.")
    for command, expected in (
        (["train", "--help"], ["(default: 0.01)", "(default: resnet)", "(default: no pruning)"]),
        (["run", "--help"], ["(default: tauopt)", "built-in 30", "(default: auto)"]),
        (["worker", "--help"], ["budget is spent", "(default: random)"]),
        (["dashboard", "--help"], ["(default: 8080)", "(default: 127.0.0.1)"]),
    ):
        with pytest.raises(SystemExit):
            main(command)
        out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        for text in expected:
            assert text in out, (command, text)


def test_data_command_checks_the_files(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "--data-dir", str(data_dir)]) == 0
    err = capsys.readouterr().err
    assert "mnist: 60,000 training and 10,000 test images of 28 x 28, 10 classes" in err
    assert "fashion-mnist: 60,000 training" in err
