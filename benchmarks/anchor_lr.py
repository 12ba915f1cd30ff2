"""Where anchor trials should put their learning rate: the default study (``configs/study.toml``)
with trials enqueued at the pruning end (the ResNet, ``layer_prune_eps`` at its highest, no
time regularisation) and one learning rate each; the sampler draws the rest (T, l1).

Each run trains those trials with ``tauopt run`` (K = 1, every core) and prints, per trial, the
learning rate, the drawn T and l1, the validation accuracy and the parameters left.

    python benchmarks/anchor_lr.py --data-dir ../shared/data --seeds 2 \\
        --lr 0.0177 0.03 0.05 0.0548 0.1 0.171 0.2 0.3 [--json out.json]
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from _machine import JSON_HELP, machine, result_path  # noqa: E402

CORNER = {"arch": "resnet", "layer_prune_eps": 0.2, "time_reg": "none"}


def run(seed: int, lrs: list[float], data_dir: Path) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        config = (REPO / "configs" / "study.toml").read_text()
        config = config.replace("[study]", "[study]\nanchors = 0", 1)  # only the ones below
        config = config.replace("n_trials = 60", f"n_trials = {len(lrs)}", 1)
        (Path(tmp) / "study.toml").write_text(config)
        url = f"sqlite:///{tmp}/study.db"
        common = ["--storage", url, "--config", f"{tmp}/study.toml"]
        tauopt = [sys.executable, "-m", "tauopt"]
        subprocess.run([*tauopt, "create", *common], check=True)
        study = optuna.load_study(study_name="tauopt", storage=url)
        for lr in lrs:
            study.enqueue_trial({**CORNER, "lr": lr})
        argv = [*tauopt, "run", *common, "--artifact-dir", f"{tmp}/a", "--data-dir"]
        argv += [str(data_dir), "--device", "cpu", "--quiet", "--threads", str(os.cpu_count())]
        subprocess.run([*argv, "--sampler-seed", str(seed)], check=True)
        trials = optuna.load_study(study_name="tauopt", storage=url).get_trials()
    return [
        {
            "seed": seed,
            "lr": t.params["lr"],
            "T": t.params["T"],
            "l1": t.params.get("l1", 0.0),
            "state": t.state.name,
            "val_accuracy": t.values[0] if t.values else None,
            "active_params": t.values[1] if t.values else None,
            "seconds": (t.datetime_complete - t.datetime_start).total_seconds(),
        }
        for t in trials
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--lr", type=float, nargs="+", required=True)
    parser.add_argument("--json", type=Path, help=JSON_HELP)
    args = parser.parse_args()
    args.json = args.json or result_path(__file__)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    for seed in range(args.seeds):
        for row in run(seed, args.lr, args.data_dir):
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.json.write_text(json.dumps({**machine(), "corner": CORNER, "trials": rows}, indent=1))


if __name__ == "__main__":
    main()
