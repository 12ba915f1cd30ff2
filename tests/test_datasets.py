"""Datasets beyond MNIST: files generated in each real on-disk format read back exactly, a real
dataset of another shape (scikit-learn's digits) as a study end to end, and every bad file
refused in one line with nothing created."""

from __future__ import annotations

import gzip
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tauopt._cli import main
from tauopt.engine import TrainConfig, load_dataset, train
from tauopt.errors import DataError
from tauopt.study import best_trials

RNG = np.random.default_rng(0)


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def _kmnist(root: Path, n: int = 300) -> dict[str, np.ndarray]:
    raw = root / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": RNG.integers(0, 10, n, dtype=np.uint8),
        "t10k-images-idx3-ubyte": RNG.integers(0, 256, (50, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": RNG.integers(0, 10, 50, dtype=np.uint8),
    }
    for name, array in arrays.items():
        _idx(raw / f"{name}.gz", array)
    return arrays


def _pickle(path: Path, data: dict[Any, Any]) -> None:
    with open(path, "wb") as fh:
        pickle.dump(data, fh, protocol=2)


def _cifar10(root: Path, per_batch: int = 60) -> tuple[np.ndarray, list[int]]:
    """Five training batches and a test batch as the real files hold them (the first with
    bytes keys, as Python 2 wrote them)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images, labels = [], []
    for i in range(1, 6):
        x = RNG.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in RNG.integers(0, 10, per_batch)]
        keys = (b"data", b"labels") if i == 1 else ("data", "labels")
        _pickle(folder / f"data_batch_{i}", {keys[0]: x, keys[1]: y, "batch_label": f"b{i}"})
        images.append(x)
        labels += y
    test = {"data": RNG.integers(0, 256, (40, 3072), dtype=np.uint8), "labels": [3] * 40}
    _pickle(folder / "test_batch", test)
    _pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return np.concatenate(images), labels


def test_generated_idx_files_of_kmnist_read_back_exactly(tmp_path: Path) -> None:
    arrays = _kmnist(tmp_path)
    data = load_dataset("kmnist", tmp_path, download=False)
    assert data.shape == (28, 28) and data.num_classes == 10 and data.sha256 is None
    assert torch.equal(
        data.train.images, torch.from_numpy(arrays["train-images-idx3-ubyte"]).reshape(300, -1)
    )
    assert data.test.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_generated_cifar10_pickles_read_back_exactly(tmp_path: Path) -> None:
    images, labels = _cifar10(tmp_path)
    data = load_dataset("cifar10", tmp_path, download=False)
    assert data.shape == (3, 32, 32) and data.in_features == 3072 and data.num_classes == 10
    assert torch.equal(data.train.images, torch.from_numpy(images))
    assert data.train.labels.tolist() == labels and data.test.labels.tolist() == [3] * 40


def test_generated_cifar100_reads_the_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    x = RNG.integers(0, 256, (120, 3072), dtype=np.uint8)
    fine = [int(v) for v in RNG.integers(0, 100, 120)]
    _pickle(folder / "train", {"data": x, "fine_labels": fine, "coarse_labels": [0] * 120})
    _pickle(folder / "test", {"data": x[:20], "fine_labels": fine[:20], "coarse_labels": [0] * 20})
    _pickle(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    data = load_dataset("cifar100", tmp_path, download=False)
    assert data.num_classes == 100 and data.train.labels.tolist() == fine


class _Exploit:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("touch pwned",))


def test_a_pickle_that_would_run_code_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _cifar10(tmp_path)
    _pickle(tmp_path / "cifar-10-batches-py" / "data_batch_3", {"data": _Exploit(), "labels": []})
    with pytest.raises(DataError, match=r"(posix|os)\.system is not data"):
        load_dataset("cifar10", tmp_path, download=False)
    assert not (tmp_path / "pwned").exists()


def test_a_cifar_network_takes_images_rows_and_pixels(tmp_path: Path) -> None:
    _cifar10(tmp_path)
    data = load_dataset("cifar10", tmp_path, download=False)
    config = TrainConfig(
        dataset="cifar10", epochs=1, width=16, depth=3, val_size=50, normalize=True
    )
    result = train(config, data, device="cpu")
    model = result.model.eval()
    pixels = data.test.images[:4]
    with torch.no_grad():
        by_rows = model(pixels.float() / 255)
        assert torch.allclose(model(pixels.reshape(4, 3, 32, 32)), by_rows)  # uint8 images
        assert torch.allclose(model(pixels.reshape(4, 3, 32, 32).float() / 255), by_rows)
        assert by_rows.shape == (4, 10)
    assert model.input_mean is not None and model.input_mean.shape == (3072,)


def _digits(path: Path) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.images.astype(np.float32), digits.target.astype(np.int16)
    np.savez(path, x_train=x[:1500], y_train=y[:1500], x_test=x[1500:], y_test=y[1500:])
    return path


DIGITS = """
[study]
n_trials = 4
min_val_accuracy = 0.3
[search]
lr = [0.05, 0.2]
width = 32
depth = 3
[trial]
dataset = "digits.npz"
epochs = 15
train_size = 0
val_size = 300
batch_size = 50
normalize = true
"""


def test_scikit_learns_digits_as_a_study_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    _digits(tmp_path / "digits.npz")
    (tmp_path / "digits.toml").write_text(DIGITS)
    assert main(["run", "--config", "digits.toml", "--quiet", "--device", "cpu"]) == 0
    trials = best_trials(None, "tauopt")
    assert trials and trials[0].val_accuracy > 0.8  # ten classes: chance is 0.1
    model = trials[0].load_model()
    data = load_dataset("digits.npz")
    assert data.shape == (8, 8) and data.num_classes == 10 and data.in_features == 64
    images = data.test.images[:50].reshape(50, 8, 8)  # floats 0..16, used as they are
    with torch.no_grad():
        predicted = model(images).argmax(1)
    assert (predicted == data.test.labels[:50]).float().mean() > 0.7
    capsys.readouterr()
    assert main(["report", "--out", "rep"]) == 0  # the report reads the shape from the record


def test_a_worker_with_another_file_refuses_to_train(tmp_path: Path) -> None:
    path = _digits(tmp_path / "digits.npz")
    (tmp_path / "digits.toml").write_text(DIGITS)
    tauopt = [sys.executable, "-m", "tauopt"]
    done = subprocess.run(
        [*tauopt, "create", "--config", "digits.toml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    with np.load(path) as arrays:
        changed = dict(arrays)
    changed["y_train"] = changed["y_train"][::-1].copy()
    np.savez(path, **changed)
    done = subprocess.run(
        [*tauopt, "worker", "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 2 and "is not the file the study was created with" in done.stderr


def _bad(tmp_path: Path, **arrays: np.ndarray) -> Path:
    good = {
        "x_train": RNG.random((400, 5)).astype(np.float32),
        "y_train": RNG.integers(0, 3, 400),
        "x_test": RNG.random((50, 5)).astype(np.float32),
        "y_test": RNG.integers(0, 3, 50),
    }
    good.update(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **{k: v for k, v in good.items() if v is not None})
    return path


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"y_test": None}, "bad.npz has no 'y_test'"),
        ({"y_train": np.zeros(399, dtype=np.int64)}, "y_train must hold one label per image (400)"),
        ({"y_train": np.full(400, -1)}, "y_train has the label -1"),
        ({"y_test": np.zeros(50, dtype=np.float32)}, "y_test must hold integer labels"),
        ({"x_train": np.full((400, 5), np.nan, dtype=np.float32)}, "x_train holds NaN"),
        (  # one image: the validation image, a fifth at least one, leaves none to train
            # (one image is one class: the file declares three, as its test labels hold)
            {
                "x_train": RNG.random((1, 5)),
                "y_train": np.zeros(1, dtype=np.int64),
                "num_classes": np.array(3),
            },
            "val_size must lie in [0, 1)",
        ),
        ({"x_test": RNG.random((50, 6))}, "differ in shape"),
    ],
)
def test_a_bad_npz_is_one_line_and_creates_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    arrays: dict[str, np.ndarray],
    message: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    _bad(tmp_path, **arrays)
    assert main(["create", "--dataset", "bad.npz"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]  # no database, nothing


def test_a_file_that_is_no_npz_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "x.npz").write_text("not numpy")
    assert main(["train", "--dataset", str(tmp_path / "x.npz")]) == 2
    assert "cannot read" in capsys.readouterr().err
