"""What a benchmark's JSON records about where it ran: the date, the CPU model and its cores
(figures are only comparable on one machine, see docs/benchmarks.md), and the code's commit."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import date
from pathlib import Path


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def commit(checkout: Path = Path(__file__).parent) -> str:
    """The checkout's commit, ``+changes`` if tracked files have uncommitted changes (new
    result files beside the scripts do not count)."""
    head = ["git", "rev-parse", "--short", "HEAD"]
    done = subprocess.run(head, cwd=checkout, capture_output=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=checkout, capture_output=True
    )
    return done.stdout.decode().strip() + ("+changes" if dirty.stdout.strip() else "")


def machine() -> dict[str, object]:
    return {
        "date": date.today().isoformat(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "commit": commit(),
    }
