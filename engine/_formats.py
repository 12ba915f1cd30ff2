"""The datasets' files as they lie on disk, read into arrays and checked.

* IDX (MNIST, Fashion-MNIST, KMNIST): unsigned bytes, plain or gzip.
* CIFAR-10 / CIFAR-100: torchvision's folders of Python pickles. A pickle can run code when it
  is loaded; these are read by an unpickler that builds nothing but dicts, lists, strings,
  numbers and numpy arrays, so a file that is no dataset cannot do harm.
* A user's ``.npz`` with ``x_train``, ``y_train``, ``x_test`` and ``y_test``, read without
  pickles.

Files are checked for format, shape and labels, not for a checksum: a user's own copy, or a
file generated for a test, is accepted as it is.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tauopt.errors import DataError

_IDX_UBYTE = 0x08


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
    count = int(np.prod(dims)) if dims else 1
    if len(raw) != header + count:
        raise DataError(
            f"{path} is truncated or corrupt: header says {dims}, so {header + count} bytes, "
            f"found {len(raw)}; delete it and fetch it again"
        )
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
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
        x = np.asarray(batch["data"])
        y = np.asarray(batch[label_key])
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(y) != len(x):
            raise DataError(
                f"{path}: expected uint8 images (N, 3072) and N labels, got {x.dtype} "
                f"{x.shape} and {y.shape}; replace it"
            )
        images.append(torch.from_numpy(x.copy()))
        labels.append(torch.from_numpy(y.astype(np.int64)))
    return torch.cat(images), torch.cat(labels)


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """A user's arrays, checked: every key there, labels integers >= 0, images finite, the
    lengths matching. Each problem is one message naming the key and the fix."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in NPZ_KEYS if k not in data.files]
            if missing:
                raise DataError(
                    f"{path} has no {missing[0]!r}: an .npz dataset holds the arrays "
                    f"{', '.join(NPZ_KEYS)}; save them with numpy.savez"
                )
            arrays = {k: np.asarray(data[k]) for k in NPZ_KEYS}
    except DataError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise DataError(
            f"cannot read {path} as an .npz file ({e}); save it with numpy.savez"
        ) from e
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim < 2 or len(x) == 0:
            raise DataError(
                f"{path}: x_{split} must hold images (N, ...) with N >= 1, got {x.shape}"
            )
        if y.ndim != 1 or len(y) != len(x):
            raise DataError(
                f"{path}: y_{split} must hold one label per image ({len(x)}), got shape {y.shape}"
            )
        if y.dtype.kind not in "iu":
            raise DataError(
                f"{path}: y_{split} must hold integer labels 0..C-1, got dtype {y.dtype}; "
                "convert the labels to integers"
            )
        if len(y) and int(y.min()) < 0:
            raise DataError(f"{path}: y_{split} has the label {int(y.min())}; labels are 0..C-1")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise DataError(f"{path}: x_{split} holds NaN or infinite values; replace them")
        if x.dtype.kind not in "fiu" or x.dtype == np.bool_:
            raise DataError(f"{path}: x_{split} must hold numbers, got dtype {x.dtype}")
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise DataError(
            f"{path}: training images {arrays['x_train'].shape[1:]} and test images "
            f"{arrays['x_test'].shape[1:]} differ in shape"
        )
    return arrays
