"""Trained networks as Optuna artifacts in a directory (a shared volume under compose)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from optuna.artifacts import FileSystemArtifactStore

from tauopt.errors import StorageError


class AtomicFileSystemArtifactStore(FileSystemArtifactStore):
    """Optuna's file-system store, but a model appears whole or not at all: it is written to
    a temporary file beside its place and renamed there, and a write that fails (a full disk)
    leaves nothing behind, where Optuna's store leaves a truncated file."""

    def __init__(self, base_path: str | Path) -> None:
        super().__init__(base_path)
        self._base = Path(base_path)

    def _path(self, artifact_id: str) -> Path:
        """Where ``artifact_id`` lives: a plain name inside the store's folder."""
        if Path(artifact_id).name != artifact_id or artifact_id in ("", ".", ".."):
            raise ValueError(f"invalid artifact id {artifact_id!r}")
        return self._base / artifact_id

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        target = self._path(artifact_id)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        try:
            with open(partial, "wb") as fh:
                shutil.copyfileobj(content_body, fh)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)


def artifact_store(directory: Path, *, create: bool = True) -> AtomicFileSystemArtifactStore:
    """A file-system artifact store in ``directory``.

    ``create=True`` (workers) makes the folder if missing and checks that a file can be written
    there, so a worker fails at start rather than after training its first trial.
    ``create=False`` (readers) only requires the folder to exist.
    """
    if not create:
        if not directory.is_dir():
            raise StorageError(
                f"no artifact directory {directory}: pass the one the workers used "
                "(--artifact-dir / $TAUOPT_ARTIFACTS)"
            )
        return AtomicFileSystemArtifactStore(str(directory))
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".tauopt-write-check-"):
            pass
    except OSError as e:
        raise StorageError(
            f"cannot write trained models to {directory}: {e.strerror or e}; choose a writable "
            "--artifact-dir (or $TAUOPT_ARTIFACTS)"
        ) from e
    return AtomicFileSystemArtifactStore(str(directory))
