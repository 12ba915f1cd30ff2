"""MNIST and Fashion-MNIST from IDX files in torchvision's folder layout, held as tensors."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from tauopt.errors import DataError

#: Dataset names accepted everywhere (CLI, config files), mapped to torchvision's folder names.
DATASETS: dict[str, str] = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_UBYTE = 0x08
#: The validation split is drawn with this seed whatever the training seed, so every trial of
#: a study selects models on the same held-out images.
SPLIT_SEED = 20230628
NUM_CLASSES = 10
#: Training accuracy is measured on this many training images (fewer where the split is
#: smaller), always the same ones: the first of the shuffled training split.
TRAIN_EVAL_SIZE = 10_000


@dataclass(frozen=True)
class ImageSet:
    """Images as a uint8 tensor ``(n, pixels)`` and labels as int64 ``(n,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class RawDataset:
    """One dataset as loaded from disk: the 60,000 training and 10,000 test images."""

    name: str
    train: ImageSet
    test: ImageSet
    num_classes: int = NUM_CLASSES

    @property
    def in_features(self) -> int:
        return int(self.train.images.shape[1])


@dataclass(frozen=True)
class Splits:
    """Float tensors on the training device, pixels in [0, 1]. ``train_eval_*`` is the fixed
    subset of the training split that training accuracy is measured on (a view, no copy);
    ``val_*`` may be empty."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def train_eval_x(self) -> torch.Tensor:
        return self.train_x[:TRAIN_EVAL_SIZE]

    @property
    def train_eval_y(self) -> torch.Tensor:
        return self.train_y[:TRAIN_EVAL_SIZE]


def default_data_dir() -> Path:
    """``$TAUOPT_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("TAUOPT_DATA", "data"))


def check_dataset_name(name: str) -> str:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return name


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file of unsigned bytes (plain or gzip) into a uint8 tensor."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}; delete it so it is fetched again") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE:
        raise DataError(f"{path} is not an IDX file of unsigned bytes; replace it")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (no complete IDX header); replace it")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    count = 1
    for dim in dims:
        count *= dim
    if len(raw) != header + count:
        raise DataError(
            f"{path} is truncated or corrupt: header says {dims}, so {header + count} bytes, "
            f"found {len(raw)}; delete it and fetch it again"
        )
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    return data.reshape(dims)


def _find(raw_dir: Path, stem: str) -> Path | None:
    for candidate in (raw_dir / stem, raw_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


#: Where torchvision fetches the files from, with the MD5 of each (gzip) file.
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}
MD5: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
_DOWNLOAD_TIMEOUT_S = 60


def _fetch(name: str, filename: str, target: Path) -> None:
    """Fetch ``filename`` from the first mirror that serves it with the expected MD5."""
    errors = []
    for mirror in MIRRORS[name]:
        url = mirror + filename
        try:
            with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
                data = response.read()
        except (OSError, ValueError) as e:  # URLError, HTTPError and timeouts are OSErrors
            errors.append(f"{url}: {' '.join(str(e).split())}")
            continue
        digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if digest != MD5[name][filename]:
            errors.append(f"{url}: MD5 {digest}, expected {MD5[name][filename]}")
            continue
        target.write_bytes(data)
        return
    raise OSError("; ".join(errors))


def _download(name: str, root: Path) -> None:
    """Fetch the four files into ``root/<Name>/raw`` from torchvision's mirrors (needs a network).

    The download goes to a temporary folder first: an offline failure leaves nothing under
    ``root``, and each file appears in place by an atomic rename, so workers that download at
    the same moment never read a half-written file.
    """
    dest = root / DATASETS[name] / "raw"
    with tempfile.TemporaryDirectory(prefix="tauopt-download-") as tmp:
        try:
            for filename in MD5[name]:
                _fetch(name, filename, Path(tmp) / filename)
        except OSError as e:
            raise DataError(
                f"the {name} files are not under {dest} and downloading them failed ({e}); "
                "copy the four IDX files (.gz or plain) there, or point --data-dir / "
                "$TAUOPT_DATA at a folder that has them"
            ) from e
        try:
            dest.mkdir(parents=True, exist_ok=True)
            for source in Path(tmp).iterdir():
                partial = dest / f".{source.name}.{os.getpid()}.part"
                shutil.copyfile(source, partial)
                os.replace(partial, dest / source.name)
        except OSError as e:
            raise DataError(
                f"downloaded {name} but cannot write it to {dest}: {e}; choose a writable "
                "--data-dir"
            ) from e


def load_dataset(name: str, root: Path | str | None = None, *, download: bool = True) -> RawDataset:
    """Load a dataset from ``root/<Name>/raw`` (torchvision's layout), downloading if absent."""
    check_dataset_name(name)
    root = Path(root) if root is not None else default_data_dir()
    raw_dir = root / DATASETS[name] / "raw"
    stems = [stem for pair in _FILES.values() for stem in pair]
    if any(_find(raw_dir, stem) is None for stem in stems):
        if not download:
            raise DataError(f"the {name} IDX files are missing under {raw_dir}")
        _download(name, root)
    parts = {}
    for split, (image_stem, label_stem) in _FILES.items():
        images = read_idx(_find(raw_dir, image_stem) or raw_dir / image_stem)
        labels = read_idx(_find(raw_dir, label_stem) or raw_dir / label_stem)
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{raw_dir}: {split} images {tuple(images.shape)} do not match labels "
                f"{tuple(labels.shape)}; replace the files"
            )
        parts[split] = ImageSet(images.reshape(images.shape[0], -1), labels.long())
    _check_contents(raw_dir, parts)
    return RawDataset(name=name, train=parts["train"], test=parts["test"])


def _check_contents(raw_dir: Path, parts: dict[str, ImageSet]) -> None:
    """Files that parse can still disagree: catch it here, not as an index error mid-trial."""
    train, test = parts["train"], parts["test"]
    if train.images.shape[1] != test.images.shape[1]:
        raise DataError(
            f"{raw_dir}: training images have {train.images.shape[1]} pixels, test images "
            f"{test.images.shape[1]}; the files come from different datasets: replace them"
        )
    for split, part in parts.items():
        if len(part) == 0:
            raise DataError(f"{raw_dir}: the {split} files hold no images; replace them")
        low, high = int(part.labels.min()), int(part.labels.max())
        if low < 0 or high >= NUM_CLASSES:
            raise DataError(
                f"{raw_dir}: {split} labels run from {low} to {high}, outside the "
                f"{NUM_CLASSES} classes 0..{NUM_CLASSES - 1}; replace the label file"
            )


def make_splits(
    dataset: RawDataset,
    *,
    val_size: int,
    train_size: int | None,
    device: torch.device,
) -> Splits:
    """Hold out a fixed validation split, optionally subsample training, move to ``device``."""
    n = len(dataset.train)
    if not 0 <= val_size < n:
        raise DataError(f"val_size must lie in [0, {n}), got {val_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    val_idx, train_idx = order[:val_size], order[val_size:]
    if train_size is not None:
        if not 0 < train_size <= train_idx.numel():
            raise DataError(
                f"train_size must lie in [1, {train_idx.numel()}] "
                f"({n} training images minus {val_size} for validation), got {train_size}"
            )
        train_idx = train_idx[:train_size]

    def to_device(images: torch.Tensor) -> torch.Tensor:
        return images.to(device).float().div_(255.0)

    return Splits(
        train_x=to_device(dataset.train.images[train_idx]),
        train_y=dataset.train.labels[train_idx].to(device),
        val_x=to_device(dataset.train.images[val_idx]),
        val_y=dataset.train.labels[val_idx].to(device),
        test_x=to_device(dataset.test.images),
        test_y=dataset.test.labels.to(device),
    )
