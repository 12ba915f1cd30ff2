"""Datasets by name, or a user's arrays, held as tensors; the splits a run trains on.

Named datasets live in torchvision's folder layout under a data root (``$TAUOPT_DATA`` or
``./data``), so an existing torchvision folder works:

========================  ============================  ===========  =======  ==========
name                      files                         input        classes  train/test
========================  ============================  ===========  =======  ==========
``mnist``                 ``MNIST/raw/`` (IDX)          28 x 28      10       60k / 10k
``fashion-mnist``         ``FashionMNIST/raw/`` (IDX)   28 x 28      10       60k / 10k
``kmnist``                ``KMNIST/raw/`` (IDX)         28 x 28      10       60k / 10k
``cifar10``               ``cifar-10-batches-py/``      3 x 32 x 32  10       50k / 10k
``cifar100``              ``cifar-100-python/``         3 x 32 x 32  100      50k / 10k
========================  ============================  ===========  =======  ==========

A missing one is downloaded (see :mod:`tauopt.engine._download`). Any other name ending in
``.npz`` is a user's arrays (:func:`tauopt.engine._formats.read_npz`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tauopt.engine._download import download
from tauopt.engine._formats import cifar_part, npz_classes, read_idx, read_npz
from tauopt.errors import DataError

#: The datasets known by name, mapped to their folder in torchvision's layout.
DATASETS: dict[str, str] = {
    "mnist": "MNIST",
    "fashion-mnist": "FashionMNIST",
    "kmnist": "KMNIST",
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
}
#: The training split of each named dataset: what a study settles its validation size on
#: before any worker has the files.
TRAIN_IMAGES: dict[str, int] = {
    "mnist": 60_000,
    "fashion-mnist": 60_000,
    "kmnist": 60_000,
    "cifar10": 50_000,
    "cifar100": 50_000,
}
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR_FILES = {
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", 10),
    "cifar100": (["train"], ["test"], "fine_labels", 100),
}
#: The validation split is drawn with this seed whatever the training seed (unless a run sets
#: its own ``split_seed``), so every trial of a study selects models on the same held-out
#: images.
SPLIT_SEED = 20230628
#: Training accuracy is measured on this many training images (fewer where the split is
#: smaller), always the same ones: the first of the shuffled training split.
TRAIN_EVAL_SIZE = 10_000


def is_arrays(name: str) -> bool:
    """Whether ``name`` names a user's ``.npz`` file rather than a dataset."""
    return name.endswith(".npz")


def check_dataset_name(name: str) -> str:
    if name not in DATASETS and not is_arrays(name):
        raise DataError(
            f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}, or give the path "
            "of an .npz file with x_train, y_train, x_test and y_test"
        )
    return name


@dataclass(frozen=True)
class ImageSet:
    """Images as a tensor ``(n, features)`` (uint8 pixels, or floats used as they are) and
    labels as int64 ``(n,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class RawDataset:
    """One dataset as loaded from disk. ``shape`` is one image's shape; ``sha256`` the content
    hash of a user's file (None for a named dataset)."""

    name: str
    train: ImageSet
    test: ImageSet
    num_classes: int
    shape: tuple[int, ...]
    sha256: str | None = None

    @property
    def in_features(self) -> int:
        return int(self.train.images.shape[1])


@dataclass(frozen=True)
class Splits:
    """Float tensors on the training device (uint8 pixels scaled to [0, 1]).
    ``train_eval_*`` is the fixed subset of the training split that training accuracy is
    measured on (a view, no copy); ``val_*`` may be empty. With standardisation, ``mean`` and
    ``std`` are the training split's per-feature statistics (the networks apply them)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None

    @property
    def train_eval_x(self) -> torch.Tensor:
        return self.train_x[:TRAIN_EVAL_SIZE]

    @property
    def train_eval_y(self) -> torch.Tensor:
        return self.train_y[:TRAIN_EVAL_SIZE]


def default_data_dir() -> Path:
    """``$TAUOPT_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("TAUOPT_DATA", "data"))


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _idx(folder: Path) -> dict[str, ImageSet]:
    parts = {}
    for split, (image_stem, label_stem) in _IDX_FILES.items():
        images = read_idx(_find(folder, image_stem) or folder / image_stem)
        labels = read_idx(_find(folder, label_stem) or folder / label_stem)
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{folder}: {split} images {tuple(images.shape)} do not match labels "
                f"{tuple(labels.shape)}; replace the files"
            )
        parts[split] = ImageSet(images.reshape(images.shape[0], -1), labels.long())
    return parts


def _cifar(folder: Path, name: str) -> dict[str, ImageSet]:
    train_files, test_files, key, _ = _CIFAR_FILES[name]
    return {
        split: ImageSet(*cifar_part([folder / f for f in files], key))
        for split, files in (("train", train_files), ("test", test_files))
    }


def _missing(name: str, folder: Path) -> bool:
    if name in _CIFAR_FILES:
        train, test, _, _ = _CIFAR_FILES[name]
        return any(not (folder / f).is_file() for f in train + test)
    stems = [stem for pair in _IDX_FILES.values() for stem in pair]
    return any(_find(folder, stem) is None for stem in stems)


def _named(name: str, root: Path, download_missing: bool) -> RawDataset:
    folder = root / DATASETS[name]
    if name not in _CIFAR_FILES:
        folder = folder / "raw"
    if _missing(name, folder):
        if not download_missing:
            raise DataError(f"the {name} files are missing under {folder}")
        download(name, folder)
    parts = _cifar(folder, name) if name in _CIFAR_FILES else _idx(folder)
    classes = _CIFAR_FILES[name][3] if name in _CIFAR_FILES else 10
    shape = (3, 32, 32) if name in _CIFAR_FILES else (28, 28)
    _check_contents(str(folder), parts, classes, "replace the files")
    return RawDataset(name, parts["train"], parts["test"], classes, shape)


def _arrays(name: str, root: Path) -> RawDataset:
    """A user's .npz: looked up as given, then under the data root."""
    path = Path(name)
    if not path.is_file() and (root / name).is_file():
        path = root / name
    if not path.is_file():
        raise DataError(f"no dataset file {name}: give the path of an .npz file")
    arrays = read_npz(path)
    classes = npz_classes(path, arrays)
    digest = _sha256(path)
    parts = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        flat = x.reshape(len(x), -1)
        images = torch.from_numpy(
            flat.copy() if flat.dtype == np.uint8 else flat.astype(np.float32)
        )
        parts[split] = ImageSet(images, torch.from_numpy(y.astype(np.int64)))
    shape = tuple(int(d) for d in arrays["x_train"].shape[1:])
    _check_contents(str(path), parts, classes, "fix the arrays")
    return RawDataset(name, parts["train"], parts["test"], classes, shape, sha256=digest)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def load_dataset(name: str, root: Path | str | None = None, *, download: bool = True) -> RawDataset:
    """Load a dataset by name from ``root`` (torchvision's layout; downloading what is
    missing), or a user's ``.npz`` file."""
    check_dataset_name(name)
    root = Path(root) if root is not None else default_data_dir()
    return _arrays(name, root) if is_arrays(name) else _named(name, root, download)


def _check_contents(where: str, parts: dict[str, ImageSet], classes: int, fix: str) -> None:
    """Files that parse can still disagree: catch it here, not as an index error mid-trial."""
    train, test = parts["train"], parts["test"]
    if train.images.shape[1] != test.images.shape[1]:
        raise DataError(
            f"{where}: training images have {train.images.shape[1]} features, test images "
            f"{test.images.shape[1]}; the files come from different datasets: {fix}"
        )
    for split, part in parts.items():
        if len(part) == 0:
            raise DataError(f"{where}: the {split} files hold no images; {fix}")
        low, high = int(part.labels.min()), int(part.labels.max())
        if low < 0 or high >= classes:
            raise DataError(
                f"{where}: {split} labels run from {low} to {high}, outside the {classes} "
                f"classes 0..{classes - 1}; {fix}"
            )


def check_split_sizes(dataset: RawDataset, *, val_size: int, train_size: int | None) -> None:
    """Refuse a validation or training size the dataset cannot give."""
    n = len(dataset.train)
    if not 0 <= val_size < n:
        raise DataError(
            f"{dataset.name} has {n:,} training images: val_size must lie in [0, {n}), got "
            f"{val_size:,}; lower --val-size (val_size in [trial])"
        )
    if train_size is not None and not 0 < train_size <= n - val_size:
        raise DataError(
            f"train_size must lie in [1, {n - val_size}] ({n} training images minus "
            f"{val_size} for validation), got {train_size}"
        )


def make_splits(
    dataset: RawDataset,
    *,
    val_size: int,
    train_size: int | None,
    device: torch.device,
    normalize: bool = False,
    seed: int = SPLIT_SEED,
) -> Splits:
    """Hold out a validation split drawn with ``seed``, optionally subsample training, move
    to ``device``; with ``normalize``, also the training split's per-feature mean and std."""
    check_split_sizes(dataset, val_size=val_size, train_size=train_size)
    n = len(dataset.train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = order[:val_size], order[val_size:]
    if train_size is not None:
        train_idx = train_idx[:train_size]
    to_device: Callable[[torch.Tensor], torch.Tensor] = _floats(device)
    train_x = to_device(dataset.train.images[train_idx])
    mean = std = None
    if normalize:
        mean, std = _statistics(train_x)
    return Splits(
        train_x=train_x,
        train_y=dataset.train.labels[train_idx].to(device),
        val_x=to_device(dataset.train.images[val_idx]),
        val_y=dataset.train.labels[val_idx].to(device),
        test_x=to_device(dataset.test.images),
        test_y=dataset.test.labels.to(device),
        mean=mean,
        std=std,
    )


def _floats(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    def convert(images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            return images.to(device).float().div_(255.0)
        return images.to(device=device, dtype=torch.float32)

    return convert


def _statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std; a constant feature (std 0, an image's border) keeps std 1,
    so that it maps to 0 rather than to infinity."""
    mean = x.mean(0)
    std = x.std(0, correction=0)
    std = torch.where(std > 1e-6 * max(1.0, float(std.max())), std, torch.ones_like(std))
    if not math.isfinite(float(std.sum())):
        raise DataError("the training images hold values too large to standardise")
    return mean, std
