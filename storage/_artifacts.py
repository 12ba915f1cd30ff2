"""Trained networks as Optuna artifacts in a directory (a shared volume under compose)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from optuna.artifacts import FileSystemArtifactStore

from tauopt.errors import StorageError


def artifact_store(directory: Path, *, create: bool = True) -> FileSystemArtifactStore:
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
        return FileSystemArtifactStore(str(directory))
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".tauopt-write-check-"):
            pass
    except OSError as e:
        raise StorageError(
            f"cannot write trained models to {directory}: {e.strerror or e}; choose a writable "
            "--artifact-dir (or $TAUOPT_ARTIFACTS)"
        ) from e
    return FileSystemArtifactStore(str(directory))
