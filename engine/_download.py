"""Fetching a named dataset that is not on disk: from torchvision's mirrors, every file checked
against its MD5, and put in place atomically (a temporary folder first, then a rename per file,
so that workers downloading at the same moment never read a half-written file)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from tauopt.errors import DataError

_TIMEOUT_S = 60

#: Where torchvision fetches the IDX files from, with the MD5 of each (gzip) file.
IDX_MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    "kmnist": ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
}
IDX_MD5: dict[str, dict[str, str]] = {
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
    "kmnist": {
        "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
        "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
        "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
        "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
    },
}
#: The CIFAR archives (torchvision's): URL and MD5; they unpack into their own folder.
ARCHIVES: dict[str, tuple[str, str]] = {
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
    ),
}


def _fetch(urls: list[str], md5: str, target: Path) -> None:
    """The first of ``urls`` that serves a file with ``md5``, written to ``target``."""
    errors = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
                data = response.read()
        except (OSError, ValueError) as e:  # URLError, HTTPError and timeouts are OSErrors
            errors.append(f"{url}: {' '.join(str(e).split())}")
            continue
        digest = hashlib.md5(data, usedforsecurity=False).hexdigest()
        if digest != md5:
            errors.append(f"{url}: MD5 {digest}, expected {md5}")
            continue
        target.write_bytes(data)
        return
    raise OSError("; ".join(errors))


def _place(tmp: Path, dest: Path) -> None:
    """Move every file of ``tmp`` into ``dest``, each by an atomic rename."""
    dest.mkdir(parents=True, exist_ok=True)
    for source in tmp.iterdir():
        partial = dest / f".{source.name}.{os.getpid()}.part"
        shutil.copyfile(source, partial)
        os.replace(partial, dest / source.name)


def download(name: str, dest: Path) -> None:
    """Fetch dataset ``name`` into ``dest`` (its folder in torchvision's layout)."""
    with tempfile.TemporaryDirectory(prefix="tauopt-download-") as tmp:
        staged = Path(tmp) / "staged"
        staged.mkdir()
        try:
            if name in IDX_MD5:
                for filename, md5 in IDX_MD5[name].items():
                    urls = [mirror + filename for mirror in IDX_MIRRORS[name]]
                    _fetch(urls, md5, staged / filename)
            else:
                url, md5 = ARCHIVES[name]
                archive = Path(tmp) / "archive.tar.gz"
                _fetch([url], md5, archive)
                with tarfile.open(archive) as tar:
                    tar.extractall(Path(tmp) / "unpacked", filter="data")
                staged = Path(tmp) / "unpacked" / dest.name
        except (OSError, tarfile.TarError) as e:
            raise DataError(
                f"the {name} files are not under {dest} and downloading them failed ({e}); "
                "copy them there in torchvision's layout, or point --data-dir / $TAUOPT_DATA "
                "at a folder that has them"
            ) from e
        try:
            _place(staged, dest)
        except OSError as e:
            raise DataError(
                f"downloaded {name} but cannot write it to {dest}: {e}; choose a writable "
                "--data-dir"
            ) from e
