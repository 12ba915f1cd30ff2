"""A big batched claim beside a small one: one worker with ``--batch-trials K`` and one with
K = 1 on one study of tiny trials, default heartbeat (10 s) and grace period (20 s). Reports
how many trainings each did, how many results were dropped (the trial had been failed as
stale and rerun elsewhere) or handed back, the wall time, and whether the budget came out
exact with nothing left running.

    python benchmarks/big_batch.py --storage sqlite:///big.db --k 512 --n-trials 1200 \\
        --data-dir ../shared/data [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from _machine import JSON_HELP, machine, result_path

from tauopt.storage import normalize_url

TINY = """
[study]
min_val_accuracy = 0.0
[search]
arch = "resnet"
depth = 2
width = 8
[trial]
epochs = 1
train_size = 100
val_size = 100
"""
_FINISHED = re.compile(
    r"worker finished: (\d+) trials here \((\d+) complete, (\d+) pruned, (\d+) failed"
    r"(?:, (\d+) queued again)?(?:, (\d+) dropped)?\)"
)


def _worker(url: str, study: str, data_dir: Path, artifacts: Path, k: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tauopt",
            "worker",
            "--storage",
            url,
            "--study",
            study,
            "--data-dir",
            str(data_dir),
            "--artifact-dir",
            str(artifacts),
            "--device",
            "cpu",
            "--threads",
            "1",
            "--quiet",
            "--batch-trials",
            str(k),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True)
    parser.add_argument("--study", default="big-batch")
    parser.add_argument("--k", type=int, default=512)
    parser.add_argument("--n-trials", type=int, default=1200)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--json", type=Path, help=JSON_HELP)
    args = parser.parse_args()
    args.json = args.json or result_path(
        __file__, "cpu", f"{args.storage.split(':')[0].split('+')[0]}_k{args.k}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "tiny.toml"
        config.write_text(TINY)
        create = [
            sys.executable,
            "-m",
            "tauopt",
            "create",
            "--storage",
            args.storage,
            "--study",
            args.study,
            "--config",
            str(config),
            "--n-trials",
            str(args.n_trials),
        ]
        subprocess.run(create, check=True)
        start = time.monotonic()
        workers = {
            k: _worker(args.storage, args.study, args.data_dir, Path(tmp) / "a", k)
            for k in (args.k, 1)
        }
        results = {}
        for k, proc in workers.items():
            err = proc.communicate()[1]
            match = _FINISHED.search(err)
            if proc.returncode != 0 or match is None:
                raise SystemExit(f"the K={k} worker failed:\n{err[-2000:]}")
            run, complete, _, failed, requeued, dropped = (int(g or 0) for g in match.groups())
            results[f"K={k}"] = {
                "trainings": run,
                "complete": complete,
                "failed": failed,
                "requeued": requeued,
                "dropped": dropped,
            }
        wall = time.monotonic() - start
    storage = normalize_url(args.storage)  # postgresql:// means psycopg2, as in tauopt
    trials = optuna.load_study(study_name=args.study, storage=storage).get_trials()
    states = {s: sum(t.state.name == s for t in trials) for s in {t.state.name for t in trials}}
    trainings = sum(r["trainings"] for r in results.values())
    dropped = sum(r["dropped"] for r in results.values())
    summary = {
        "storage": args.storage.split("://")[0],
        "k": args.k,
        "n_trials": args.n_trials,
        "workers": results,
        "wall_seconds": round(wall, 1),
        "dropped_share": round(dropped / trainings, 4),
        "states": states,
        "exact_budget": states.get("COMPLETE", 0) == args.n_trials and not states.get("RUNNING"),
    }
    summary = {**machine(), **summary}
    print(json.dumps(summary, indent=1))
    args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
