"""Errors of the storage layer."""

from __future__ import annotations

from tauopt.errors import TauoptError


class StorageError(TauoptError):
    """The storage URL, database or study cannot be used; the message says how to fix it."""
