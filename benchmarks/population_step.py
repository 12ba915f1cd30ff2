"""Per-member cost of the population's training step against each network's own step.

For every architecture (ResNet, fractional, a half-and-half mix) and every group size K, one
:class:`tauopt.models.TauPopulation` of K reference networks (width 100, depth 6, mixed T,
gamma and horizon constraints) takes SGD steps on real MNIST batches of 100, next to the
engine's step of one network alone (``loss_and_grad``, the optimiser step, the projection).
All of them run in short bursts, interleaved round by round, so that a slow phase of a shared
machine hits them alike; the table gives medians over the rounds of milliseconds per member
and step, and the median of the per-round ratios alone / together (above 1: batching pays).
A last row times the matrix products of a ResNet population's step alone: the floor of its
arithmetic, against which the rest of the step is overhead.

    python benchmarks/population_step.py --data-dir ../shared/data --k 1 2 4 8 16 32
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _machine import JSON_HELP, result_path

from tauopt.engine import TrainConfig
from tauopt.engine._data import load_dataset, make_splits
from tauopt.engine._train import build_model, make_optimizer
from tauopt.models import TauPopulation

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def _configs(arch: str, k: int) -> list[TrainConfig]:
    rng = random.Random(0)
    return [
        TrainConfig(
            arch="fracdnn" if arch == "fracdnn" or (arch == "mixed" and i % 2) else "resnet",
            T=rng.uniform(0.5, 10.0),
            gamma=rng.uniform(0.1, 0.9),
            dependent_last_tau=i % 3 == 0,
            seed=i,
        )
        for i in range(k)
    ]


def _alone(arch: str) -> Callable[[Batches], None]:
    config = _configs(arch, 1)[0]
    model = build_model(config, 784, 10)
    optimizer = make_optimizer(model, config)

    def run(batches: Batches) -> None:
        for x, y in batches:
            model.loss_and_grad(x, y)
            optimizer.step()
            model.project_taus_()

    return run


def _together(arch: str, k: int) -> Callable[[Batches], None]:
    population = TauPopulation([build_model(c, 784, 10) for c in _configs(arch, k)])
    lr, l1, horizon = (torch.full((k,), v) for v in (0.01, 0.001, 0.01))

    def run(batches: Batches) -> None:
        for x, y in batches:
            population.sgd_step_(x, y, lr=lr, l1=l1, horizon_weight=horizon)

    return run


def _products(
    k: int, width: int = 100, depth: int = 6, classes: int = 10
) -> Callable[[Batches], None]:
    """The floor: the matrix products of a ResNet population's step alone (the input layer on
    the shared batch, the hidden and output layers batched over the members, forward, the
    gradients passed down and every weight's update), on preallocated tensors, nothing else."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(k, width, 784, generator=g) * 0.01
    hidden = torch.randn(k, depth - 1, width, width, generator=g) * 0.01
    w_out = torch.randn(k, classes, width, generator=g) * 0.01

    def run(batches: Batches) -> None:
        for x, _ in batches:
            n = x.shape[0]
            state = (x @ w0.reshape(k * width, -1).t()).view(n, k, width).transpose(0, 1)
            states = [state]
            for layer in range(depth - 1):
                state = torch.bmm(state, hidden[:, layer].transpose(1, 2))
                states.append(state)
            logits = torch.bmm(state, w_out.transpose(1, 2))
            grad = torch.bmm(logits, w_out)
            w_out.baddbmm_(logits.transpose(1, 2), state, alpha=-1e-9)
            for layer in reversed(range(depth - 1)):
                below = states[layer]
                hidden[:, layer].baddbmm_(grad.transpose(1, 2), below, alpha=-1e-9)
                grad = torch.bmm(grad, hidden[:, layer])
            w0.baddbmm_(grad.transpose(1, 2), x.expand(k, *x.shape), alpha=-1e-9)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--member-steps", type=int, default=320, help="per burst")
    parser.add_argument("--json", type=Path, help=JSON_HELP)
    args = parser.parse_args()
    args.json = args.json or result_path(__file__)
    torch.set_num_threads(args.threads)
    dataset = load_dataset("mnist", args.data_dir, download=False)
    splits = make_splits(dataset, val_size=10_000, train_size=None, device=torch.device("cpu"))
    order = torch.randperm(splits.train_x.shape[0], generator=torch.Generator().manual_seed(0))
    batches = [
        (splits.train_x.index_select(0, i), splits.train_y.index_select(0, i))
        for i in order[: 100 * args.member_steps].split(100)
    ]
    runs: dict[tuple[str, int], tuple[Callable[[Batches], None], int]] = {}
    for arch in ("resnet", "fracdnn", "mixed"):
        if arch != "mixed":
            runs[(arch, 0)] = (_alone(arch), 1)  # K = 0: the engine's step, alone
        for k in args.k:
            runs[(arch, k)] = (_together(arch, k), k)
    for k in args.k:
        runs[("products", k)] = (_products(k), k)
    per_member: dict[tuple[str, int], list[float]] = {key: [] for key in runs}
    for fn, _ in runs.values():  # warm-up
        fn(batches[:3])
    for r in range(args.rounds):
        keys = list(runs) if r % 2 == 0 else list(reversed(runs))
        for key in keys:
            fn, k = runs[key]
            steps = batches[: max(3, args.member_steps // k)]
            start = time.perf_counter()
            fn(steps)
            per_member[key].append((time.perf_counter() - start) / len(steps) / k * 1e3)
    _print(per_member, args.k, args.rounds)
    raw = {f"{a}/{k or 'alone'}": v for (a, k), v in per_member.items()}
    args.json.write_text(json.dumps({"threads": args.threads, "ms": raw}, indent=1) + "\n")


def _print(per_member: dict[tuple[str, int], list[float]], ks: list[int], rounds: int) -> None:
    print(f"ms per member and step, median of {rounds} rounds (alone / together in brackets)")
    print("| members | " + " | ".join(str(k) for k in ks) + " | alone |")
    print("|---" * (len(ks) + 2) + "|")
    for arch in ("resnet", "fracdnn", "mixed"):
        # a mix's "alone" is the mean of the two networks' own steps, round by round
        alone = [
            statistics.fmean(pair)
            for pair in zip(per_member[("resnet", 0)], per_member[("fracdnn", 0)], strict=True)
        ]
        own = per_member.get((arch, 0), alone)
        cells = []
        for k in ks:
            times = per_member[(arch, k)]
            ratio = statistics.median(a / t for a, t in zip(own, times, strict=True))
            cells.append(f"{statistics.median(times):.2f} ({ratio:.2f}x)")
        print(f"| {arch} | " + " | ".join(cells) + f" | {statistics.median(own):.2f} |")
    # 2 flops per multiply-add: forward, gradients passed down (not to the input), updates
    flops = 2 * 100 * (3 * (784 * 100 + 5 * 100 * 100 + 100 * 10) - 784 * 100) / 1e6
    cells = []
    for k in ks:
        ms = statistics.median(per_member[("products", k)])
        cells.append(f"{ms:.2f} ({flops / ms:.0f} GFLOP/s)")
    print("| ResNet's matrix products alone | " + " | ".join(cells) + " | - |")


if __name__ == "__main__":
    main()
