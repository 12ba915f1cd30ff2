"""What a compiled CPU step would save: the engine's ResNet step against the same step in C++.

``compiled_step.cpp`` is the engine's ResNet training step (gather, forward, cross-entropy,
backward, SGD; no l1 or horizon penalty) as one C++ function with the same ATen matrix products
and fused elementwise loops: no Python and no per-op dispatch between the products. It is not
part of tauopt (it would need a compiler and a build step wherever tauopt is installed); this
script measures what it would buy. Both steps start from the same weights and train on the same
MNIST batches; the script first checks that they agree, then alternates bursts of 50 steps of
each and reports the median of the paired ratios (drift of the machine's speed cancels out).
Needs ``pip install ninja`` and g++ (the extension compiles on first use, about a minute).
Usage::

    python benchmarks/compiled_step.py [--data-dir ../shared/data] [--rounds 40]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.cpp_extension import load

from tauopt.engine import TrainConfig, build_model, load_dataset, make_splits
from tauopt.engine._step import TrainStep
from tauopt.engine._train import make_optimizer

Step = Callable[[torch.Tensor], Any]


def compiled_step(model: Any, x: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> Step:
    """The C++ step on ``model``'s parameters (updated in place), with its own buffers."""
    ext = load(
        name="tauopt_compiled_step",
        sources=[str(Path(__file__).with_name("compiled_step.cpp"))],
        extra_cflags=["-O3", "-mavx2", "-mfma"],
    )
    weights = [block.weight.data for block in model.blocks]
    biases = [block.bias.data for block in model.blocks]
    depth, width, batch = len(weights), weights[0].shape[0], config.batch_size
    buffers = [
        torch.empty(batch, x.shape[1]),  # gathered images
        torch.empty(batch, dtype=torch.long),  # gathered labels
        *(torch.empty(depth, batch, width) for _ in range(4)),  # acts, states, grad d, grad z
        torch.empty(width, x.shape[1]),  # grad W_0
        torch.empty(depth - 1, width, width),  # grad W_1..
        torch.empty(depth, width),  # grad b
        torch.empty(batch, model.output.weight.shape[0]),  # logits
        torch.empty_like(model.output.weight),  # grad W_out
        torch.empty(depth),  # grad tau
    ]
    args = (
        weights,
        [w.t() for w in weights],
        biases,
        model.output.weight.data,
        model.tau_free.data,
        config.lr,
    )
    return lambda idx: ext.resnet_step(x, y, idx, *args, *buffers)


def burst(step: Step, batches: list[torch.Tensor]) -> float:
    """Microseconds per step over ``batches``."""
    start = time.perf_counter()
    for idx in batches:
        step(idx)
    return (time.perf_counter() - start) / len(batches) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    dataset = load_dataset("mnist", args.data_dir, download=False)
    splits = make_splits(dataset, val_size=10_000, train_size=None, device=torch.device("cpu"))
    x, y = splits.train_x, splits.train_y
    config = TrainConfig(arch="resnet", epochs=1, seed=0)
    engine_model, c_model = (build_model(config, 784, 10) for _ in range(2))
    c_model.load_state_dict(engine_model.state_dict())
    engine = TrainStep(
        engine_model, make_optimizer(engine_model, config), x, y, l1=0.0, horizon_weight=0.0
    )
    compiled = compiled_step(c_model, x, y, config)
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
    size = config.batch_size
    batches = list(order[: (x.shape[0] // size) * size].view(-1, size))
    with torch.no_grad():
        for idx in batches[:20]:
            engine(idx)
            compiled(idx)
        gap = max(
            (a - b).abs().max().item()
            for a, b in zip(engine_model.parameters(), c_model.parameters(), strict=True)
        )
        print(f"largest parameter difference after 20 steps: {gap:.1e}")
        if gap > 1e-5:
            raise SystemExit("the compiled step does not compute the engine's step")
        ratios, engine_us, compiled_us = [], [], []
        for r in range(args.rounds):
            start = (r * 50) % (len(batches) - 50)
            chunk = batches[start : start + 50]
            engine_us.append(burst(engine, chunk))
            compiled_us.append(burst(compiled, chunk))
            ratios.append(compiled_us[-1] / engine_us[-1])
    print(
        f"engine step median {statistics.median(engine_us):.0f} us, compiled step median "
        f"{statistics.median(compiled_us):.0f} us; compiled / engine, median of "
        f"{args.rounds} paired bursts: {statistics.median(ratios):.3f}"
    )


if __name__ == "__main__":
    main()
