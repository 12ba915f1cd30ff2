"""What anchors (``study.anchors``) do to the main job, ``make run``'s study (the default
config: 30 Pareto trials of 3 epochs): the same study with ``anchors = 3`` and ``anchors = 0``,
alternating per sampler seed, one worker (K = 1, every core).

Per run it records each trial's end (seconds from the first trial's start), validation
accuracy and parameters left, and the hypervolume of the feasible front after 3, 10 and 30
trials, with ``front_per_hour.py``'s reference point (accuracy 0.5, 130,006 parameters).

    python benchmarks/anchors_main_job.py --data-dir ../shared/data --seeds 3 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from _machine import JSON_HELP, machine, result_path  # noqa: E402
from front_per_hour import FLOOR, hypervolume  # noqa: E402

AFTER = (3, 10, 30)


def run(seed: int, anchors: int, data_dir: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "study.toml").write_text(f"[study]\nanchors = {anchors}\n")
        url = f"sqlite:///{tmp}/study.db"
        argv = [sys.executable, "-m", "tauopt", "run", "--storage", url, "--config"]
        argv += [f"{tmp}/study.toml", "--artifact-dir", f"{tmp}/a", "--data-dir", str(data_dir)]
        argv += ["--device", "cpu", "--quiet", "--threads", str(os.cpu_count())]
        subprocess.run([*argv, "--sampler-seed", str(seed)], check=True, capture_output=True)
        trials = optuna.load_study(study_name="tauopt", storage=url).get_trials()
    done = sorted(
        (t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.datetime_complete
    )
    start = min(t.datetime_start for t in done)
    rows = [
        {
            "number": t.number,
            "anchor": "anchor" in t.user_attrs,
            "seconds": round((t.datetime_complete - start).total_seconds(), 2),
            "val_accuracy": t.values[0],
            "active_params": t.values[1],
        }
        for t in done
    ]
    points = [(r["val_accuracy"], r["active_params"]) for r in rows]
    return {
        "seed": seed,
        "anchors": anchors,
        "trials": rows,
        "hypervolume_after": {n: round(hypervolume(points[:n]), 5) for n in AFTER},
        "seconds_after": {n: rows[n - 1]["seconds"] for n in AFTER if n <= len(rows)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", type=Path, help=JSON_HELP)
    args = parser.parse_args()
    args.json = args.json or result_path(__file__)
    results = []
    for seed in range(args.seeds):
        for anchors in (3, 0) if seed % 2 == 0 else (0, 3):  # alternating: no arm always first
            result = run(seed, anchors, args.data_dir)
            results.append(result)
            print(
                f"seed {seed} anchors {anchors}: hypervolume after 3/10/30 trials "
                f"{result['hypervolume_after']}, at {result['seconds_after']} s",
                flush=True,
            )
    out = {"machine": machine(), "floor": FLOOR, "results": results}
    args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
