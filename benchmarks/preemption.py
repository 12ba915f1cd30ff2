"""A preempted worker against one never stopped: a population of K scaled-down runs (one
``--batch-trials K`` worker, every run in one group), whose worker is stopped every
``--every`` seconds and started again until the study is done, against the same runs trained
by one worker in one go.

Reports the extra compute (CPU seconds and wall seconds of every worker process, summed,
against the uninterrupted worker's), the stops, where each trial resumed, and whether every
trial's metrics and per-epoch records are identical (bitwise) to the uninterrupted run's.

    python benchmarks/preemption.py --data-dir ../shared/data [--every 20] [--signal TERM]
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
from _machine import JSON_HELP, machine, result_path

from tauopt.storage import StorageSettings
from tauopt.study import create_study, load_config

CONFIG = """
[study]
anchors = 0
[search]
arch = "resnet"
T = [0.5, 10.0]
l1 = [0.0002, 0.02]
layer_prune_eps = [0.02, 0.2]
time_reg = ["none", "penalty", "dependent"]
horizon_weight = [0.001, 0.1]
lr = [0.01, 0.3]
[trial]
epochs = {epochs}
train_size = {train_size}
checkpoint_seconds = {checkpoint_seconds}
[storage]
heartbeat_interval = 1
grace_period = 4
"""
#: The members: every setting the search varies, each in a few places (a fixed list, so that
#: both studies train the same runs; the seeds are the trial numbers).
MEMBERS: list[dict[str, Any]] = [
    {"T": 1.0, "l1": 0.005, "layer_prune_eps": 0.1, "time_reg": "none", "lr": 0.1},
    {"T": 6.0, "l1": 0.01, "layer_prune_eps": 0.05, "time_reg": "none", "lr": 0.05},
    {"T": 2.0, "l1": 0.002, "layer_prune_eps": 0.15, "time_reg": "dependent", "lr": 0.2},
    {"T": 0.7, "l1": 0.02, "layer_prune_eps": 0.2, "time_reg": "none", "lr": 0.3},
    {
        "T": 3.0,
        "l1": 0.001,
        "layer_prune_eps": 0.08,
        "time_reg": "penalty",
        "horizon_weight": 0.05,
        "lr": 0.08,
    },
    {"T": 1.5, "l1": 0.0005, "layer_prune_eps": 0.03, "time_reg": "dependent", "lr": 0.02},
    {
        "T": 8.0,
        "l1": 0.008,
        "layer_prune_eps": 0.12,
        "time_reg": "penalty",
        "horizon_weight": 0.01,
        "lr": 0.03,
    },
    {"T": 1.0, "l1": 0.015, "layer_prune_eps": 0.18, "time_reg": "none", "lr": 0.15},
]
#: What must be identical between a preempted trial and the same trial never stopped.
METRICS = (
    "val_accuracy",
    "test_accuracy",
    "taus",
    "active_params",
    "active_block_ids",
    "pruned_layers",
    "val_accuracy_history",
    "train_accuracy_history",
    "train_loss_history",
    "clean_loss_history",
    "penalty_history",
    "tau_history",
)


def _study(url: str, name: str, args: argparse.Namespace, folder: Path) -> None:
    path = folder / f"{name}.toml"
    path.write_text(
        CONFIG.format(
            epochs=args.epochs,
            train_size=args.train_size,
            checkpoint_seconds=args.checkpoint_seconds,
        )
    )
    config = load_config(path).with_overrides(n_trials=len(MEMBERS))
    study = create_study(StorageSettings(url=url), name, config)
    for params in MEMBERS:
        study.enqueue_trial(params)


def _worker(url: str, name: str, data_dir: Path, artifacts: Path) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "tauopt", "worker", "--storage", url, "--study", name]
    argv += ["--data-dir", str(data_dir), "--artifact-dir", str(artifacts), "--device", "cpu"]
    argv += ["--threads", "1", "--quiet", "--batch-trials", str(len(MEMBERS))]
    return subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run(
    url: str,
    name: str,
    args: argparse.Namespace,
    artifacts: Path,
    every: float | None,
) -> dict[str, Any]:
    """Workers one after another until the study is done; with ``every``, each is sent the
    signal ``every`` seconds after it started (if it still runs)."""
    runs = []
    while True:
        cpu, start = _cpu(), time.monotonic()
        proc = _worker(url, name, args.data_dir, artifacts)
        stopped = False
        try:
            proc.wait(timeout=every)
        except subprocess.TimeoutExpired:
            proc.send_signal(getattr(signal, f"SIG{args.signal}"))
            stopped = True
        err = proc.communicate()[1]
        if proc.returncode not in (0, -signal.SIGKILL):
            raise SystemExit(f"a worker failed ({proc.returncode}):\n{err[-3000:]}")
        runs.append(
            {
                "stopped": stopped,
                "wall_seconds": round(time.monotonic() - start, 2),
                "cpu_seconds": round(_cpu() - cpu, 2),
                "exit": proc.returncode,
                "lines": [line for line in err.splitlines() if "goes on" in line][:20],
            }
        )
        if not stopped:
            return {"workers": runs}


def _trials(url: str, name: str) -> dict[int, dict[str, Any]]:
    trials = optuna.load_study(study_name=name, storage=url).get_trials()
    done = [t for t in trials if t.state.name == "COMPLETE"]
    if len(done) != len(MEMBERS) or any(t.state.name in ("RUNNING", "WAITING") for t in trials):
        raise SystemExit(f"study {name} did not end with its budget: {[t.state for t in trials]}")
    return {t.user_attrs["seed"]: t.user_attrs for t in done}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--every", type=float, default=20.0, help="seconds between stops")
    parser.add_argument("--signal", choices=["TERM", "KILL"], default="TERM")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--train-size", type=int, default=10_000)
    parser.add_argument("--checkpoint-seconds", type=float, default=60.0)
    parser.add_argument("--json", type=Path, help=JSON_HELP)
    args = parser.parse_args()
    args.json = args.json or result_path(__file__, "cpu", f"sig{args.signal.lower()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        url = f"sqlite:///{folder / 'preemption.db'}"
        _study(url, "whole", args, folder)
        _study(url, "preempted", args, folder)
        whole = _run(url, "whole", args, folder / "whole", None)
        preempted = _run(url, "preempted", args, folder / "preempted", args.every)
        want, got = _trials(url, "whole"), _trials(url, "preempted")
        # what starting a worker costs: one on the finished study starts, finds nothing, ends
        start = _run(url, "whole", args, folder / "whole", None)["workers"][0]
        left = sorted(p.name for p in (folder / "preempted").glob("checkpoints/*"))
    identical = {seed: all(got[seed][m] == want[seed][m] for m in METRICS) for seed in sorted(want)}
    cpu = {
        name: sum(w["cpu_seconds"] for w in run["workers"])
        for name, run in (("whole", whole), ("preempted", preempted))
    }
    wall = {
        name: sum(w["wall_seconds"] for w in run["workers"])
        for name, run in (("whole", whole), ("preempted", preempted))
    }
    summary = {
        **machine(),
        "members": len(MEMBERS),
        "epochs": args.epochs,
        "train_size": args.train_size,
        "checkpoint_seconds": args.checkpoint_seconds,
        "signal": f"SIG{args.signal}",
        "every_seconds": args.every,
        "stops": sum(w["stopped"] for w in preempted["workers"]),
        "cpu_seconds": cpu,
        "wall_seconds": {k: round(v, 1) for k, v in wall.items()},
        "extra_cpu": round(cpu["preempted"] / cpu["whole"] - 1, 4),
        "extra_wall": round(wall["preempted"] / wall["whole"] - 1, 4),
        # a worker's start (imports, data, study) with nothing to train: the fixed cost of
        # every restart
        "start_cpu_seconds": start["cpu_seconds"],
        "start_wall_seconds": start["wall_seconds"],
        "identical": identical,
        "all_identical": all(identical.values()),
        "resumed_from": {seed: got[seed]["resumed_from"] for seed in sorted(got)},
        "states_left": left,
        "whole": whole,
        "preempted": preempted,
    }
    print(json.dumps(summary, indent=1))
    args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
