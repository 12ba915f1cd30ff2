"""The fractional step's tau arithmetic on the CPU: Python floats against device ops.

A FractionalDNN step computes the L1 scheme's memory weights from the taus (a depth x depth
matrix and its gradient). On the CPU this runs as Python floats; on a GPU as tensor ops, which
is also the only form the population step has. Writing the formula once means the tensor form
everywhere; this measures what that would cost a lone CPU trial. One process alternates bursts
of real training steps (loss_and_grad, optimiser step, projection on the same MNIST batches)
with each form and reports the median of the paired ratios, which drift cancels out of::

    python benchmarks/frac_arithmetic.py --data-dir ../shared/data [--rounds 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from _burst import burst
from _machine import JSON_HELP, machine, result_path

from tauopt.engine._config import TrainConfig
from tauopt.engine._data import load_dataset, make_splits
from tauopt.engine._train import build_model, make_optimizer
from tauopt.models import _fractional


def _burst(model: Any, optimizer: Any, batches: list[Any], host: bool) -> float:
    """Microseconds per step over ``batches`` with the host (True) or device (False) form."""
    _fractional.host_arithmetic = lambda device: host and device.type == "cpu"  # type: ignore[assignment]
    return burst((model, optimizer), batches)  # the training steps ab/step_ab.py times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--depth", type=int, nargs="+", default=[6, 20])
    parser.add_argument("--json", type=Path, help=JSON_HELP)
    args = parser.parse_args()
    args.json = args.json or result_path(__file__)
    torch.set_num_threads(1)  # a worker's default: one thread per trial
    dataset = load_dataset("mnist", args.data_dir, download=False)
    splits = make_splits(dataset, val_size=10_000, train_size=None, device=torch.device("cpu"))
    order = torch.randperm(splits.train_x.shape[0], generator=torch.Generator().manual_seed(0))
    batches = [
        (splits.train_x.index_select(0, i), splits.train_y.index_select(0, i))
        for i in order[:2000].split(100)
    ]
    results = []
    for depth in args.depth:
        cfg = TrainConfig(arch="fracdnn", depth=depth, epochs=1, seed=0)
        runs = {}
        for host in (True, False):
            model = build_model(cfg, splits.train_x.shape[1], 10)
            runs[host] = (model, make_optimizer(model, cfg))
            _burst(*runs[host], batches[:5], host)  # warm-up
        times: dict[bool, list[float]] = {True: [], False: []}
        for r in range(args.rounds):
            for host in (True, False) if r % 2 == 0 else (False, True):
                times[host].append(_burst(*runs[host], batches, host))
        ratios = [d / h for h, d in zip(times[True], times[False], strict=True)]
        row = {
            "depth": depth,
            "host_us_per_step": statistics.median(times[True]),
            "device_us_per_step": statistics.median(times[False]),
            "device_over_host_median": statistics.median(ratios),
            "ratio_quartiles": statistics.quantiles(ratios, n=4),
            "rounds": args.rounds,
        }
        results.append(row)
        print(
            f"fracdnn depth {depth}: host floats {row['host_us_per_step']:.0f} us/step, device "
            f"ops {row['device_us_per_step']:.0f} us/step, device/host median ratio "
            f"{row['device_over_host_median']:.3f} over {args.rounds} paired bursts"
        )
    args.json.write_text(json.dumps({**machine(), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
