"""The dataset download, against a real HTTP server on loopback serving the real files."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tauopt._cli import main
from tauopt.engine import _download, load_dataset


@pytest.fixture()
def mirror(tmp_path: Path, data_dir: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 serving a copy of the MNIST files; yields (url, folder)."""
    served = tmp_path / "served"
    shutil.copytree(data_dir / "MNIST" / "raw", served)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", served
    finally:
        server.shutdown()
        server.server_close()


def _md5s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.gz"))}


def test_download_tries_the_next_mirror_and_checks_md5(
    mirror: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, served = mirror
    # The first mirror answers 404 for every file; the second serves them.
    monkeypatch.setitem(_download.IDX_MIRRORS, "mnist", (url + "missing/", url))
    monkeypatch.setitem(_download.IDX_MD5, "mnist", _md5s(served))
    root = tmp_path / "data"
    dataset = load_dataset("mnist", root)
    assert len(dataset.train) == 60_000 and len(dataset.test) == 10_000
    assert _md5s(root / "MNIST" / "raw") == _md5s(served)
    assert not list((root / "MNIST" / "raw").glob(".*.part"))


def test_a_corrupt_download_is_refused_and_leaves_nothing(
    mirror: tuple[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, served = mirror
    monkeypatch.setitem(_download.IDX_MIRRORS, "mnist", (url,))
    expected = _md5s(served)
    expected["t10k-labels-idx1-ubyte.gz"] = "0" * 32  # as if the mirror served other bytes
    monkeypatch.setitem(_download.IDX_MD5, "mnist", expected)
    missing = tmp_path / "nonexistent"
    assert main(["train", "--data-dir", str(missing), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert str(missing / "MNIST" / "raw") in err and "downloading them failed" in err
    assert "t10k-labels-idx1-ubyte.gz: MD5" in err and "Traceback" not in err
    assert not missing.exists()


def test_offline_download_names_every_mirror_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Port 9 on loopback (discard) has no listener here: the connection is refused at once.
    monkeypatch.setitem(
        _download.IDX_MIRRORS, "mnist", ("http://127.0.0.1:9/a/", "http://127.0.0.1:9/b/")
    )
    missing = tmp_path / "nonexistent"
    assert main(["data", "--data-dir", str(missing), "--dataset", "mnist"]) == 2
    err = capsys.readouterr().err
    assert "http://127.0.0.1:9/a/" in err and "http://127.0.0.1:9/b/" in err
    assert not missing.exists()
