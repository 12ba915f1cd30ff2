"""bfloat16 products against float32: what they cost in accuracy on the reproduce cells, and
what they save per epoch.

    python benchmarks/precision.py accuracy --data-dir ../shared/data [--seeds 3]
        [--epochs 10] [--train-size 10000] [--json out]
    python benchmarks/precision.py speed --data-dir ../shared/data [--repeats 3]
        [--k 1 4 16] [--json out]

``accuracy`` trains every run of ``tauopt reproduce --protocol authors`` (both datasets, both
networks) in float32 and in bfloat16, each precision's runs of one shape as one population (as
a worker with ``--batch-trials`` does), and reports the paired differences of final test
accuracy (bfloat16 - float32) per network and dataset: the mean over seeds with its 95 % t
interval (a seed's runs averaged first, as ``tauopt report`` pairs them).

``speed`` times one epoch per member, float32 and bfloat16 alternating in one process, alone
(float32: the lone network's fused step; bfloat16: a population of one) and as populations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _machine import JSON_HELP, machine, result_path
from input_size import member_epoch_seconds

from tauopt.engine import (
    RawDataset,
    TrainConfig,
    TrainResult,
    group_key,
    load_dataset,
    train_population,
)
from tauopt.study._evidence import by_unit
from tauopt.study._reproduce import grid

PRECISIONS = ("float32", "bfloat16")


def _train_all(configs: Sequence[TrainConfig], datasets: dict[str, RawDataset]) -> list[float]:
    """Final test accuracy of every config, runs of one shape trained as one population."""
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, config in enumerate(configs):
        groups.setdefault(group_key(config), []).append(i)
    accuracy = [float("nan")] * len(configs)
    for indices in groups.values():
        members = [configs[i] for i in indices]
        results = train_population(members, datasets[members[0].dataset], device="cpu")
        for i, result in zip(indices, results, strict=True):
            if isinstance(result, TrainResult):
                accuracy[i] = result.test_accuracy
    return accuracy


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    runs = grid(
        protocol="authors", epochs=args.epochs, train_size=args.train_size, seeds=args.seeds
    )
    datasets = {
        d: load_dataset(d, args.data_dir, download=False) for d in ("mnist", "fashion-mnist")
    }
    by_precision: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    for precision in PRECISIONS:
        start = time.perf_counter()
        configs = [r.config.replace(precision=precision) for r in runs]
        by_precision[precision] = _train_all(configs, datasets)
        seconds[precision] = time.perf_counter() - start
        print(f"{precision}: {len(runs)} runs in {seconds[precision]:.0f} s", flush=True)
    rows = []
    for dataset in datasets:
        for arch in ("resnet", "fracdnn"):
            picked = [
                i
                for i, r in enumerate(runs)
                if r.config.dataset == dataset and r.config.arch == arch
            ]
            diffs = [
                (runs[i].config.seed, by_precision["bfloat16"][i] - by_precision["float32"][i])
                for i in picked
            ]
            d = by_unit(diffs)
            rows.append(
                {
                    "dataset": dataset,
                    "arch": arch,
                    "runs_per_seed": len(picked) // args.seeds,
                    "seeds": d.n,
                    "mean": d.mean,
                    "low": d.low,
                    "high": d.high,
                    "verdict": d.verdict,
                    "largest_abs_difference": max(abs(v) for _, v in diffs),
                }
            )
            print(
                f"{dataset} {arch}: bfloat16 - float32 = {100 * d.mean:+.2f} pts "
                f"{d.interval('+.4f')} over {d.n} seeds ({d.verdict}); largest single run "
                f"{100 * rows[-1]['largest_abs_difference']:.2f} pts",
                flush=True,
            )
    return {
        "epochs": args.epochs,
        "train_size": args.train_size,
        "seeds": args.seeds,
        "runs": [
            {**r.coords, **{p: by_precision[p][i] for p in PRECISIONS}} for i, r in enumerate(runs)
        ],
        "seconds": seconds,
        "paired_differences": rows,
    }


def speed(args: argparse.Namespace) -> dict[str, Any]:
    dataset = load_dataset("mnist", args.data_dir, download=False)
    rows: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for arch in ("resnet", "fracdnn"):
            for k in args.k:
                for precision in PRECISIONS:
                    base = TrainConfig(
                        arch=arch,  # type: ignore[arg-type]
                        epochs=1,
                        train_size=args.train_size,
                        val_size=1_000,
                        data_seed=0,
                        precision=precision,  # type: ignore[arg-type]
                    )
                    members = [base.replace(seed=s, lr=0.01 * (s + 1)) for s in range(k)]
                    key = f"{arch} K={k} {precision}"
                    rows.setdefault(key, []).append(member_epoch_seconds(members, dataset))
                    print(f"{key}: {rows[key][-1]:.3f} s per member-epoch", flush=True)
    ratios = {}
    for arch in ("resnet", "fracdnn"):
        for k in args.k:
            pairs = zip(rows[f"{arch} K={k} float32"], rows[f"{arch} K={k} bfloat16"], strict=True)
            per_repeat = [f / b for f, b in pairs]
            ratios[f"{arch} K={k}"] = {
                "median": statistics.median(per_repeat),
                "min": min(per_repeat),
                "max": max(per_repeat),
            }
            print(
                f"{arch} K={k}: float32 / bfloat16 time = {statistics.median(per_repeat):.2f} "
                f"(range {min(per_repeat):.2f}-{max(per_repeat):.2f}, {len(per_repeat)} repeats)"
            )
    return {
        "train_size": args.train_size,
        "repeats": args.repeats,
        "seconds_per_member_epoch": rows,
        "speedup_float32_over_bfloat16": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("accuracy", "speed"))
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--json", type=Path, help=JSON_HELP)
    args = parser.parse_args()
    args.json = args.json or result_path(__file__, "cpu", args.part)
    out = accuracy(args) if args.part == "accuracy" else speed(args)
    record = {**machine(), "threads": torch.get_num_threads(), "part": args.part, **out}
    args.json.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
