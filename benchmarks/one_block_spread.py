"""How far the final validation accuracy of a network pruned to one block scatters between
runs: the default study's trial (10 epochs of 50,000 MNIST images, batch 100, the study's one
batch order) for ResNets that prune to one block after their first epoch, over weight seeds,
T and learning rates, and one fixed configuration over weight seeds; ``--data-seeds`` trains
the grid again under other batch orders (a study's trials all share one).

The hypervolume of the default Pareto study's front is almost all one such network (see "The
front per hour" in docs/benchmarks.md): how far its accuracy scatters between runs decides how
often one more of them moves the front.

    python benchmarks/one_block_spread.py --data-dir ../shared/data --seeds 0 1 2 \\
        [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from _machine import JSON_HELP, machine, result_path  # noqa: E402

from tauopt.engine import TrainConfig, load_dataset, train  # noqa: E402
from tauopt.study import load_config  # noqa: E402
from tauopt.study._objective import STUDY_DATA_SEED  # noqa: E402

#: The default study's trial size, as its workers train it.
BUDGET = load_config(REPO / "configs" / "study.toml").trial
TRIAL: dict[str, Any] = {
    "dataset": BUDGET.dataset,
    "epochs": BUDGET.epochs,
    "train_size": BUDGET.train_images,
    "batch_size": BUDGET.batch_size,
    "val_size": BUDGET.val_size,
    "normalize": BUDGET.normalize,
}
#: The pruning end of its search space.
CORNER: dict[str, Any] = {"arch": "resnet", "prune_eps": 0.2}
#: A configuration from the baseline's first random trial at sampler seed 4 (the default
#: search space): the ResNet, no time regularisation, pruned to one block after epoch 1.
FIXED: dict[str, Any] = {"arch": "resnet", "prune_eps": 0.1203, "T": 0.9552, "lr": 0.2767}
FIXED_L1 = 0.0015


def one(data: Any, data_seed: int, **settings: Any) -> dict[str, Any]:
    config = TrainConfig(data_seed=data_seed, **TRIAL, **settings)
    start = time.perf_counter()
    result = train(config, data)
    row = {
        **settings,
        "data_seed": data_seed,
        "val_accuracy": result.history.val_accuracy[-1],
        "val_accuracy_per_epoch": result.history.val_accuracy,
        "active_params": result.active_params,
        "active_blocks": result.active_blocks,
        "seconds": round(time.perf_counter() - start, 2),
    }
    print(json.dumps({k: v for k, v in row.items() if k != "val_accuracy_per_epoch"}), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--T", type=float, nargs="+", default=[1.0, 5.0])
    parser.add_argument("--lr", type=float, nargs="+", default=[0.128, 0.25])
    parser.add_argument(
        "--data-seeds",
        type=int,
        nargs="+",
        default=[STUDY_DATA_SEED],
        help="batch orders (a study's trials all share the first)",
    )
    parser.add_argument("--no-fixed", action="store_true", help="only the grid")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, help=JSON_HELP)
    args = parser.parse_args()
    args.json = args.json or result_path(
        __file__, "cpu", "orders" if len(args.data_seeds) > 1 else ""
    )
    torch.set_num_threads(args.threads)
    data = load_dataset(BUDGET.dataset, args.data_dir, download=False)
    grid = [
        one(data, order, seed=seed, T=T, lr=lr, **CORNER)
        for order, seed, T, lr in itertools.product(args.data_seeds, args.seeds, args.T, args.lr)
    ]
    orders = [] if args.no_fixed else args.data_seeds
    fixed = [
        one(data, order, seed=seed, l1=FIXED_L1, **FIXED)
        for order, seed in itertools.product(orders, args.seeds)
    ]
    rows = grid + fixed
    one_block = [r["val_accuracy"] for r in rows if r["active_blocks"] == 1]
    summary = {
        "one_block_runs": len(one_block),
        "mean": round(statistics.mean(one_block), 4),
        "stdev": round(statistics.stdev(one_block), 4),
        "min": min(one_block),
        "max": max(one_block),
        "fixed_config": [r["val_accuracy"] for r in fixed],
        "mean_per_data_seed": {
            order: round(
                statistics.mean(r["val_accuracy"] for r in grid if r["data_seed"] == order), 4
            )
            for order in args.data_seeds
        },
    }
    print(json.dumps(summary), flush=True)
    args.json.write_text(json.dumps({**machine(), "runs": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
