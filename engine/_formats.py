"""The datasets' files as they lie on disk, read into arrays and checked.

* IDX (MNIST, Fashion-MNIST, KMNIST): unsigned bytes, plain or gzip.
* CIFAR-10 / CIFAR-100: torchvision's folders of Python pickles. A pickle can run code when it
  is loaded; these are read by an unpickler that builds nothing but dicts, lists, strings,
  numbers and numpy arrays, so a file that is no dataset cannot do harm.
* A user's ``.npz`` with ``x_train``, ``y_train``, ``x_test`` and ``y_test`` (and, optionally,
  ``num_classes``), read without pickles.

Memory stays bounded by what a file declares, checked before anything large is allocated: an
IDX header's dimensions, a .npy entry's shape and dtype (against the size its zip entry
declares, and the machine's memory), a CIFAR batch's array before any list in it is converted.

Files are checked for format, shape and labels, not for a checksum: a user's own copy, or a
file generated for a test, is accepted as it is.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tauopt.errors import DataError

_IDX_UBYTE = 0x08


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file of unsigned bytes (plain or gzip) into a uint8 tensor; no more is read
    than its header declares (a small .gz cannot unpack into all of memory)."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            head = fh.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != _IDX_UBYTE:
                raise DataError(f"{path} is not an IDX file of unsigned bytes; replace it")
            ndim = head[3]
            raw_dims = fh.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise DataError(f"{path} is truncated (no complete IDX header); replace it")
            dims = [int.from_bytes(raw_dims[4 * i : 4 * i + 4], "big") for i in range(ndim)]
            count = math.prod(dims)
            if count > memory_bytes():
                raise DataError(
                    f"{path} declares {dims} ({count:,} bytes), more than this machine's "
                    "memory; delete it and fetch it again"
                )
            raw = fh.read(count + 1)  # one byte more: a longer file is no file of this header
    except DataError:
        raise
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {e}; delete it so it is fetched again") from e
    header = 4 + 4 * ndim
    if len(raw) != count:
        found = f"{header + len(raw)}" if len(raw) < count else "more"
        raise DataError(
            f"{path} is truncated or corrupt: header says {dims}, so {header + count} bytes, "
            f"found {found}; delete it and fetch it again"
        )
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return data.reshape(dims)


class _DataUnpickler(pickle.Unpickler):
    """Builds containers, numbers, strings and numpy arrays: nothing that runs code."""

    _ALLOWED: frozenset[tuple[str, str]] = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("_codecs", "encode"),  # how Python 2 pickles (the CIFAR files) store bytes
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not data")
        return super().find_class(module, name)


def read_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR batch file as a dict with str keys."""
    try:
        with open(path, "rb") as fh:
            data = _DataUnpickler(fh, encoding="latin1").load()
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated, not a pickle, or not data
        raise DataError(
            f"{path} is not a CIFAR batch file ({type(e).__name__}: {e}); replace it"
        ) from e
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a CIFAR batch file (no dict inside); replace it")
    return {k.decode() if isinstance(k, bytes) else str(k): v for k, v in data.items()}


def cifar_part(paths: list[Path], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3072) uint8, channels first, and labels (N,) of CIFAR batch files."""
    images, labels = [], []
    for path in paths:
        batch = read_pickle(path)
        if "data" not in batch or label_key not in batch:
            raise DataError(f"{path} has no 'data' or {label_key!r}; replace it")
        x, y = batch["data"], batch[label_key]
        # Checked as they are, before any conversion: a list of references to one row
        # takes a few bytes each in the file and a whole row each once made an array.
        if (
            not isinstance(x, np.ndarray)
            or x.dtype != np.uint8
            or x.ndim != 2
            or x.shape[1] != 3 * 32 * 32
            or not isinstance(y, (list, np.ndarray))
            or len(y) != len(x)
        ):
            got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
            raise DataError(
                f"{path}: expected uint8 images (N, 3072) and N labels, got {got} and "
                f"{len(y) if isinstance(y, (list, np.ndarray)) else type(y).__name__} labels; "
                "replace it"
            )
        if not all(type(v) is int for v in y) if isinstance(y, list) else y.dtype.kind not in "iu":
            raise DataError(f"{path}: the labels must be whole numbers; replace it")
        try:
            labels_array = np.asarray(y, dtype=np.int64)
        except OverflowError as e:
            raise DataError(f"{path}: a label is beyond any class; replace it") from e
        images.append(torch.from_numpy(x.copy()))
        labels.append(torch.from_numpy(labels_array))
    return torch.cat(images), torch.cat(labels)


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
#: The optional entry of an .npz that declares its number of classes: then labels may have
#: gaps (classes without training images) and test labels any class below it.
NPZ_CLASSES = "num_classes"
#: The most classes a dataset may declare.
MAX_CLASSES = 100_000
_NPZ_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def memory_bytes() -> int:
    """This machine's memory, the bound on what a file may make tauopt allocate."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _npy_header(zf: zipfile.ZipFile, key: str, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype that the .npz entry ``key`` declares, read from its header alone,
    and checked against the size the zip declares for the entry."""
    info = zf.getinfo(f"{key}.npy")
    with zf.open(info) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise DataError(
                f"{path}: {key} is a .npy of version {version}; save it with numpy.savez"
            )
        offset = fh.tell()
    if dtype.hasobject:
        raise DataError(f"{path}: {key} holds Python objects, not numbers; save numeric arrays")
    size = math.prod(shape) * dtype.itemsize
    if offset + size != info.file_size:
        raise DataError(
            f"{path}: {key} declares {shape} {dtype} ({size:,} bytes), but its entry holds "
            f"{info.file_size - offset:,}; the file is damaged: save it again with numpy.savez"
        )
    return tuple(int(d) for d in shape), dtype


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Every entry's declared shape and dtype, before any array is read."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = {n.removesuffix(".npy") for n in zf.namelist()}
            missing = [k for k in NPZ_KEYS if k not in names]
            if missing:
                raise DataError(
                    f"{path} has no {missing[0]!r}: an .npz dataset holds the arrays "
                    f"{', '.join(NPZ_KEYS)}; save them with numpy.savez"
                )
            keys = [*NPZ_KEYS, *([NPZ_CLASSES] if NPZ_CLASSES in names else [])]
            return {k: _npy_header(zf, k, path) for k in keys}
    except DataError:
        raise
    except _NPZ_READ_ERRORS as e:
        raise DataError(
            f"cannot read {path} as an .npz file ({e or type(e).__name__}); save it with "
            "numpy.savez"
        ) from e


def _check_declared(path: Path, headers: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
    """Shapes, dtypes and the memory they need, as declared: refused before allocating."""
    need = 0
    for split in ("train", "test"):
        (xs, xd), (ys, yd) = headers[f"x_{split}"], headers[f"y_{split}"]
        if len(xs) < 2 or xs[0] == 0 or math.prod(xs[1:]) == 0:
            raise DataError(
                f"{path}: x_{split} must hold images (N, ...) with N >= 1 and at least one "
                f"feature, got {xs}"
            )
        if xd.kind not in "fiu" or xd == np.bool_:
            raise DataError(f"{path}: x_{split} must hold numbers, got dtype {xd}")
        if len(ys) != 1 or ys[0] != xs[0]:
            raise DataError(
                f"{path}: y_{split} must hold one label per image ({xs[0]}), got shape {ys}"
            )
        if yd.kind not in "iu":
            raise DataError(
                f"{path}: y_{split} must hold integer labels 0..C-1, got dtype {yd}; "
                "convert the labels to integers"
            )
        # the arrays as read, float32 images as trained on, int64 labels
        need += math.prod(xs) * (xd.itemsize + 4) + ys[0] * (yd.itemsize + 8)
    if headers["x_train"][0][1:] != headers["x_test"][0][1:]:
        raise DataError(
            f"{path}: training images {headers['x_train'][0][1:]} and test images "
            f"{headers['x_test'][0][1:]} differ in shape"
        )
    if NPZ_CLASSES in headers:
        shape, dtype = headers[NPZ_CLASSES]
        if math.prod(shape) != 1 or dtype.kind not in "iu":
            raise DataError(
                f"{path}: {NPZ_CLASSES} must be one integer (the number of classes), got "
                f"{dtype} {shape}"
            )
    have = memory_bytes()
    if need > have:
        raise DataError(
            f"{path} declares arrays that need {need / 2**30:.1f} GiB to load and train on, "
            f"more than this machine's {have / 2**30:.1f} GiB; use fewer or smaller images"
        )


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """A user's arrays, checked: every key there, their shapes, dtypes and memory as declared
    (before any is read), labels integers >= 0, images finite in float32. Each problem is one
    message naming the key and the fix."""
    headers = _npz_headers(path)
    _check_declared(path, headers)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in headers}
    except _NPZ_READ_ERRORS as e:
        raise DataError(
            f"cannot read {path} as an .npz file ({e or type(e).__name__}); save it with "
            "numpy.savez"
        ) from e
    top = float(np.finfo(np.float32).max)
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if int(y.min()) < 0:
            raise DataError(f"{path}: y_{split} has the label {int(y.min())}; labels are 0..C-1")
        if x.dtype.kind == "f":
            if not np.isfinite(x).all():
                raise DataError(f"{path}: x_{split} holds NaN or infinite values; replace them")
            largest = float(np.abs(x).max())
            if largest > top:
                raise DataError(
                    f"{path}: x_{split} holds values as large as {largest:.3g}, beyond the "
                    f"{top:.3g} of the float32 numbers training computes in; scale the images "
                    "(to [0, 1], say)"
                )
    return arrays


def npz_classes(path: Path, arrays: dict[str, np.ndarray]) -> int:
    """The number of classes of a user's arrays: those of the training labels, 0..C-1 each
    with training images; or, where the file declares ``num_classes``, that many (then
    classes without training images are allowed). A test label outside them, gaps among the
    training labels, or a single class is refused with one line."""
    y_train, y_test = arrays["y_train"], arrays["y_test"]
    seen = np.unique(y_train)
    high = int(seen[-1])
    if NPZ_CLASSES in arrays:
        declared = int(np.asarray(arrays[NPZ_CLASSES]).reshape(-1)[0])
        if not 2 <= declared <= MAX_CLASSES:
            raise DataError(
                f"{path}: {NPZ_CLASSES} is {declared}; a classifier has 2..{MAX_CLASSES:,} classes"
            )
        for split, y in (("train", y_train), ("test", y_test)):
            if int(y.max()) >= declared:
                raise DataError(
                    f"{path}: y_{split} holds the label {int(y.max())}, outside the "
                    f"{NPZ_CLASSES} = {declared} classes 0..{declared - 1}; fix the label or "
                    f"{NPZ_CLASSES}"
                )
        return declared
    if len(seen) < 2:
        raise DataError(
            f"{path}: every training label is {high}: a classifier needs images of two classes "
            "at least"
        )
    if high + 1 != len(seen):
        gaps = high + 1 - len(seen)
        missing = np.setdiff1d(np.arange(min(high + 1, int(seen[0]) + len(seen) + 3)), seen)[:3]
        shown = ", ".join(str(int(m)) for m in missing) + (", ..." if gaps > len(missing) else "")
        raise DataError(
            f"{path}: y_train runs to the label {high:,}, but {gaps:,} of the classes 0..{high:,} "
            f"have no training image ({shown}); number the classes 0..{len(seen) - 1} without "
            f"gaps, or store {NPZ_CLASSES} in the .npz to keep classes without training images"
        )
    outside = y_test[y_test > high]
    if len(outside):
        raise DataError(
            f"{path}: y_test holds the label {int(outside.max()):,}, which no training image "
            f"has (the training labels are 0..{high}); fix the test labels, or store "
            f"{NPZ_CLASSES} in the .npz to allow classes without training images"
        )
    return high + 1
