"""What a benchmark's JSON records about where it ran: the date, the CPU model and its cores
(figures are only comparable on one machine, see docs/benchmarks.md)."""

from __future__ import annotations

import os
import platform
from datetime import date
from pathlib import Path


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, object]:
    return {"date": date.today().isoformat(), "cpu": cpu_model(), "cores": os.cpu_count()}
