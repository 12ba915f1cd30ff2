"""A/B of the training step of two checkouts of tauopt, in one process.

Whole-epoch timings on a machine whose speed drifts (see the README) cannot resolve a change of
a few per cent. This loads both checkouts side by side, alternates short bursts of real training
steps (the engine's loss_and_grad, optimiser step and projection on the same MNIST batches) and
reports the median of the paired ratios, which drift cancels out of. Each checkout is imported
through a tree of links laid out as the wheel installs it (see ``checkout_ab.py``). Usage::

    python benchmarks/ab/step_ab.py OLD_CHECKOUT NEW_CHECKOUT [--rounds 40] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: _burst
from _burst import burst
from checkout_ab import link_tree


def load_checkout(root: Path, tree: Path) -> tuple[ModuleType, ModuleType]:
    """The engine and config modules of the checkout at ``root`` (linked into ``tree``),
    imported under their own names and then unregistered, so that the next checkout imports
    afresh."""
    sys.path.insert(0, str(link_tree(root, tree)))
    try:
        engine = importlib.import_module("tauopt.engine._train")
        config = importlib.import_module("tauopt.engine._config")
    finally:
        sys.path.pop(0)
        for name in [n for n in sys.modules if n.split(".")[0] == "tauopt"]:
            del sys.modules[name]
    return engine, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tauopt-step-ab-") as tmp:
        trees = {side: Path(tmp) / side for side in ("old", "new")}
        checkouts = [load_checkout(getattr(args, side), tree) for side, tree in trees.items()]
        compare(checkouts, args.data_dir, args.rounds)


def compare(checkouts: list[tuple[ModuleType, ModuleType]], data_dir: Path, rounds: int) -> None:
    data = importlib.import_module("tauopt.engine._data")
    dataset = data.load_dataset("mnist", data_dir, download=False)
    splits = data.make_splits(dataset, val_size=10_000, train_size=None, device=torch.device("cpu"))
    order = torch.randperm(splits.train_x.shape[0], generator=torch.Generator().manual_seed(0))
    batches = [
        (splits.train_x.index_select(0, i), splits.train_y.index_select(0, i))
        for i in order[:5000].split(100)
    ]
    for arch in ("resnet", "fracdnn"):
        runs = []
        for engine, config in checkouts:
            cfg = config.TrainConfig(arch=arch, epochs=1, seed=0)
            model = engine.build_model(cfg, 784, 10)
            runs.append((model, engine.make_optimizer(model, cfg)))
        for run in runs:  # warm-up
            burst(run, batches[:20])
        times: list[list[float]] = [[], []]
        for r in range(rounds):
            for k in (0, 1) if r % 2 == 0 else (1, 0):
                times[k].append(burst(runs[k], batches))
        ratios = [new / old for old, new in zip(times[0], times[1], strict=True)]
        print(
            f"{arch}: old {statistics.median(times[0]):.0f} us/step, new "
            f"{statistics.median(times[1]):.0f} us/step, new/old median ratio "
            f"{statistics.median(ratios):.3f}"
        )


if __name__ == "__main__":
    main()
