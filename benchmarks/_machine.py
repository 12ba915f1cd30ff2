"""What a benchmark's JSON records about where it ran: the date, the CPU model and its cores
(figures are only comparable on one machine, see docs/benchmarks.md), and the code's commit;
and where it goes: ``benchmarks/results/<script>_<device>_<date>[_<what>].json``."""

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


RESULTS = Path(__file__).resolve().parent / "results"
JSON_HELP = "where the JSON goes (default: benchmarks/results/<script>_<device>_<date>.json)"


def device_label(device: str = "cpu") -> str:
    """``cpu``, or for ``cuda[:N]`` the GPU's model in lower case (``h100``, ``h200``)."""
    if not device.startswith("cuda"):
        return device
    import torch  # only here: most benchmarks that record where they ran never touch a GPU

    if not torch.cuda.is_available():
        return "cuda"  # the script's own check of the device says what is wrong
    words = torch.cuda.get_device_name(torch.device(device)).replace("NVIDIA", "").split()
    return words[0].lower() if words else "cuda"


def result_path(script: str, device: str = "cpu", what: str = "") -> Path:
    """Where a run of ``script`` (its ``__file__``) writes its JSON by default:
    ``benchmarks/results/<script>_<device>_<date>[_<what>].json``, ``what`` naming the variant
    where one script writes several kinds of result. A file that is already there is kept: a
    second run of the day gets ``_2``, the next ``_3``."""
    stem = f"{Path(script).stem}_{device_label(device)}_{date.today().isoformat()}"
    stem += f"_{what}" if what else ""
    path, n = RESULTS / f"{stem}.json", 2
    while path.exists():
        path, n = RESULTS / f"{stem}_{n}.json", n + 1
    return path
