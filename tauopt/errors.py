"""Exception types of tauopt. The CLI turns every :class:`TauoptError` into a message and exit 2."""

from __future__ import annotations


class TauoptError(Exception):
    """Base of every error tauopt raises on purpose: the message says what to do."""


class ConfigError(TauoptError, ValueError):
    """A configuration value is invalid; the message names the value and the fix."""


class DataError(TauoptError):
    """A dataset is missing or corrupt; the message names the path and what to do."""


class DivergedError(TauoptError):
    """Training produced a non-finite loss or step size."""

    def __init__(self, epoch: int, detail: str) -> None:
        super().__init__(f"training diverged in epoch {epoch}: {detail}")
        self.epoch = epoch
        self.detail = detail


class StorageError(TauoptError):
    """The storage URL, database, study or artifact store cannot be used; the message says how."""


class DependencyError(TauoptError):
    """An installed library is not a version tauopt supports; the message names the versions."""
