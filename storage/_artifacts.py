"""Trained networks as Optuna artifacts in a directory (a shared volume under compose)."""

from __future__ import annotations

from pathlib import Path

from optuna.artifacts import FileSystemArtifactStore

from tauopt.errors import StorageError


def artifact_store(directory: Path) -> FileSystemArtifactStore:
    """A file-system artifact store in ``directory``, created if missing."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(f"cannot create artifact directory {directory}: {e}") from e
    return FileSystemArtifactStore(str(directory))
