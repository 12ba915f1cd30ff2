"""Damaged and hostile data files, as ``train``, ``create`` and a starting worker meet them:
one line that blames the file (not the network or the learning rate), nothing created, and
memory bounded by what the file declares, checked before anything large is allocated."""

from __future__ import annotations

import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tauopt._cli import main
from tauopt.engine import _formats, load_dataset
from tauopt.errors import DataError

RNG = np.random.default_rng(3)
TINY = "[study]\nmin_val_accuracy = 0.0\n[trial]\nepochs = 1\nval_size = 100\ntrain_size = 200\n"


def _arrays(**changes: Any) -> dict[str, Any]:
    good: dict[str, Any] = {
        "x_train": RNG.random((400, 5)).astype(np.float32),
        "y_train": np.arange(400) % 3,
        "x_test": RNG.random((50, 5)).astype(np.float32),
        "y_test": np.arange(50) % 3,
    }
    good.update(changes)
    return {k: v for k, v in good.items() if v is not None}


def _save(path: Path, compressed: bool = False, **changes: Any) -> Path:
    (np.savez_compressed if compressed else np.savez)(path, **_arrays(**changes))
    return path


def _one_line(err: str, message: str) -> None:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def _lying_header(path: Path) -> Path:
    """A valid zip whose ``x_train`` entry declares a billion images in its .npy header."""
    _save(path)
    with zipfile.ZipFile(path) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    x = entries["x_train.npy"]
    length = int.from_bytes(x[8:10], "little")  # version 1.0: the header's length
    header = x[10 : 10 + length].replace(b"(400, 5)", b"(1000000000, 5)")
    header = header.rstrip().ljust(length - 1) + b"\n"  # the same length: less padding
    entries["x_train.npy"] = x[:10] + header + x[10 + length :]
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def _truncated(path: Path) -> Path:
    data = _save(path, compressed=True).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _corrupt_deflate(path: Path) -> Path:
    _save(path, compressed=True)
    data = bytearray(path.read_bytes())
    middle = len(data) // 4
    data[middle : middle + 64] = bytes(64)  # inside the first entry's compressed data
    path.write_bytes(bytes(data))
    return path


BAD_NPZ = [
    (_truncated, "cannot read"),
    (_corrupt_deflate, "cannot read"),
    (_lying_header, "the file is damaged"),
    (lambda p: _save(p, x_train=np.zeros((400, 0))), "at least one feature"),
    (lambda p: _save(p, x_train=np.zeros((400, 3, 0))), "at least one feature"),
    (lambda p: _save(p, x_train=np.zeros(400)), "must hold images (N, ...)"),
    (lambda p: _save(p, y_train=np.zeros((400, 1), dtype=np.int64)), "one label per image"),
    (lambda p: _save(p, x_test=np.full((50, 5), "a")), "must hold numbers"),
    (lambda p: _save(p, x_train=np.zeros((400, 5), dtype=bool)), "must hold numbers"),
    (lambda p: _save(p, num_classes=np.array([2.5])), "must be one integer"),
    (lambda p: _save(p, y_train=np.arange(400) % 3 * 2_500_000), "have no training image"),
    (lambda p: _save(p, y_train=(np.arange(400) % 2) * 10**9), "have no training image"),
    (lambda p: _save(p, x_train=np.full((400, 5), 1e300)), "beyond the 3.4e+38 of the float32"),
    (lambda p: _save(p, y_train=np.zeros(400, dtype=np.int64)), "every training label is 0"),
    (lambda p: _save(p, y_test=np.full(50, 12)), "y_test holds the label 12"),
    (lambda p: _save(p, num_classes=np.array(10**7)), "a classifier has 2..100,000 classes"),
    (lambda p: _save(p, num_classes=np.array(3), y_test=np.full(50, 3)), "outside the"),
]
IDS = [
    "truncated-zip",
    "corrupt-deflate",
    "lying-header",
    "zero-features",
    "zero-features-3d",
    "one-dimensional",
    "labels-2d",
    "strings",
    "booleans",
    "float-num-classes",
    "label-5000000",
    "label-1e9",
    "pixels-1e300",
    "one-class",
    "test-label-outside",
    "ten-million-classes",
    "label-above-num-classes",
]


@pytest.mark.parametrize(("make", "message"), BAD_NPZ, ids=IDS)
@pytest.mark.parametrize("command", ["train", "create"])
def test_a_bad_npz_is_one_line_that_blames_the_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    make: Any,
    message: str,
    command: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    make(tmp_path / "bad.npz")
    extra = ["--val-size", "100", "--epochs", "1"] if command == "train" else []
    assert main([command, "--dataset", "bad.npz", *extra]) == 2
    err = capsys.readouterr().err
    _one_line(err, message)
    assert "learning rate" not in err and "--width" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz"]  # nothing created


def test_a_file_damaged_after_create_stops_the_worker_at_start_in_one_line(
    tmp_path: Path,
) -> None:
    _save(tmp_path / "mine.npz")
    (tmp_path / "tiny.toml").write_text(TINY)
    tauopt = [sys.executable, "-m", "tauopt"]
    done = subprocess.run(
        [*tauopt, "create", "--config", "tiny.toml", "--dataset", "mine.npz"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    _truncated(tmp_path / "mine.npz")
    done = subprocess.run(
        [*tauopt, "worker", "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 2
    _one_line(done.stderr, "cannot read")


def test_classes_come_from_the_training_labels_unless_the_file_declares_them(
    tmp_path: Path,
) -> None:
    data = load_dataset(str(_save(tmp_path / "a.npz")))
    assert data.num_classes == 3
    # classes without training images, allowed by the file's own num_classes
    gaps = _save(tmp_path / "b.npz", y_train=np.arange(400) % 3 * 4, num_classes=np.array(12))
    data = load_dataset(str(gaps))
    assert data.num_classes == 12
    assert sorted(set(data.train.labels.tolist())) == [0, 4, 8]


def _max_rss_mb(argv: list[str], cwd: Path) -> tuple[int, float, str]:
    """``tauopt argv`` in a process of its own: exit status, its peak memory (MB), stderr."""
    probe = (
        "import resource, sys\n"
        "from tauopt._cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *argv], cwd=cwd, capture_output=True, text=True
    )
    rss = [line for line in done.stderr.splitlines() if line.startswith("maxrss")]
    return done.returncode, int(rss[0].split()[1]) / 1024, done.stderr


def test_a_small_npz_that_declares_much_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """1 MB on disk, 630 MB of zeros declared, and labels that do not match: refused from
    the headers, within the memory of a failing command that reads nothing (the file's
    arrays read whole would take 630 MB, and their float32 copy 310 MB more)."""
    path = _save(
        tmp_path / "big.npz",
        compressed=True,
        x_train=np.zeros((100_000, 784)),
        y_train=np.zeros(99_999, dtype=np.int64),
    )
    assert path.stat().st_size < 2_000_000
    code, big, err = _max_rss_mb(["train", "--dataset", "big.npz"], tmp_path)
    assert code == 2 and "one label per image" in err, err
    _save(tmp_path / "small.npz", y_train=np.zeros(399, dtype=np.int64))
    code, small, err = _max_rss_mb(["train", "--dataset", "small.npz"], tmp_path)
    assert code == 2 and "one label per image" in err, err
    assert big < small + 100, (big, small)


def test_arrays_beyond_the_machines_memory_are_refused_from_their_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_formats, "memory_bytes", lambda: 1_000_000)
    path = _save(tmp_path / "a.npz", x_train=np.zeros((400, 500)), x_test=np.zeros((50, 500)))
    with pytest.raises(DataError, match="more than this machine's"):
        _formats.read_npz(path)


def _cifar_with_rows_by_reference(root: Path, rows: int) -> None:
    """CIFAR-10's files, the first batch's images a list of ``rows`` references to one list
    of 3,072 numbers: a few bytes each in the pickle, 24 KB each as an int64 array."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    row = list(range(3072))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": [row] * rows, "labels": [0] * rows}, fh, protocol=2)


def test_a_cifar_pickle_of_references_is_refused_before_it_is_converted(
    tmp_path: Path,
) -> None:
    """40,000 rows by reference (170 KB) cost no more memory than 40 before refusal: read
    whole, the rows alone would be 40,000 x 3,072 x 8 bytes = 983 MB."""
    peaks = []
    for rows in (40, 40_000):
        root = tmp_path / str(rows)
        _cifar_with_rows_by_reference(root, rows)
        assert (root / "cifar-10-batches-py" / "data_batch_1").stat().st_size < 200_000
        argv = ["data", "--dataset", "cifar10", "--data-dir", str(root)]
        code, peak, err = _max_rss_mb(argv, tmp_path)
        assert code == 2 and "expected uint8 images (N, 3072)" in err and "got list" in err, err
        _one_line(err, "data_batch_1")
        peaks.append(peak)
    assert peaks[1] < peaks[0] + 100, peaks


def test_a_cifar_label_beyond_any_integer_is_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = RNG.integers(0, 256, (4, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": x, "labels": [0, 1, 2, 10**30]}, fh, protocol=2)
    with pytest.raises(DataError, match="beyond any class"):
        load_dataset("cifar10", tmp_path, download=False)


def test_an_idx_file_that_declares_more_than_memory_is_refused_from_its_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_formats, "memory_bytes", lambda: 10_000)
    path = tmp_path / "images"
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (100, 28, 28))
    path.write_bytes(header + bytes(100 * 28 * 28))
    with pytest.raises(DataError, match="more than this machine's memory"):
        _formats.read_idx(path)
    # a file longer than its header says is damaged too, and found without reading it all
    monkeypatch.undo()
    path.write_bytes(header + bytes(100 * 28 * 28 + 5))
    with pytest.raises(DataError, match="found more"):
        _formats.read_idx(path)
