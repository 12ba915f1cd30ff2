"""Whole-machine trials per hour for combinations of workers x threads on one machine.

Each combination runs a fresh SQLite study of the default trial size (``configs`` of the
built-in default: 3 epochs on 10,000 MNIST images, the reference ResNet) with W worker
processes of T torch threads each, and counts the trials finished per hour of wall time. The
combinations run one after another, interleaved over ``--repeats`` rounds, so that a slow phase
of a shared machine hits them alike.

    python benchmarks/workers_threads.py --data-dir ../shared/data --trials 12 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _machine import JSON_HELP, result_path


def _run(workers: int, threads: int, trials: int, data_dir: Path) -> float:
    """Trials per hour of one study run by ``workers`` processes of ``threads`` threads."""
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/bench.db"
        tauopt = [sys.executable, "-m", "tauopt"]
        subprocess.run(
            [*tauopt, "create", "--storage", url, "--n-trials", str(trials)],
            check=True,
            capture_output=True,
        )
        start = time.perf_counter()
        worker = [*tauopt, "worker", "--storage", url, "--data-dir", str(data_dir), "--quiet"]
        worker += ["--device", "cpu", "--threads", str(threads), "--artifact-dir", f"{tmp}/a"]
        procs = [
            subprocess.Popen(
                worker,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(workers)
        ]
        if any(p.wait() != 0 for p in procs):
            raise RuntimeError(f"a worker failed ({workers} x {threads})")
        return trials / (time.perf_counter() - start) * 3600


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--trials", type=int, default=12, help="trials per study")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", "--out", type=Path, help=JSON_HELP)
    args = parser.parse_args(argv)
    args.json = args.json or result_path(__file__)
    cores = os.cpu_count() or 1
    combos = sorted({(w, t) for w in (1, 2, cores) for t in (1, 2, cores) if w * t <= 2 * cores})
    rates: dict[str, list[float]] = {f"{w}x{t}": [] for w, t in combos}
    for _ in range(args.repeats):
        for workers, threads in combos:
            rate = _run(workers, threads, args.trials, args.data_dir)
            rates[f"{workers}x{threads}"].append(rate)
            print(f"{workers} workers x {threads} threads: {rate:.0f} trials/hour", flush=True)
    result = {
        "cores": cores,
        "trials_per_study": args.trials,
        "median_trials_per_hour": {k: statistics.median(v) for k, v in rates.items()},
        "runs": rates,
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
