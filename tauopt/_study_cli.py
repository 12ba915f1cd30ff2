"""Study commands of the CLI (create, worker, run, best, export, dashboard)."""

from __future__ import annotations

from typing import Any


def add_study_commands(sub: Any) -> None:
    """Register the study subcommands on ``sub``."""
