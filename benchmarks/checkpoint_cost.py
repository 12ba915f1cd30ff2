"""What saving running trials' states costs: one save (every member's state built, written to a
temporary file, flushed to disk and renamed into place) against one epoch, for a lone run
(K = 1) and a population (K = 12) at the reference size (width 100, depth 6, MNIST, batch 100,
50,000 training images, one thread), and what that is at the default ``checkpoint_seconds``
(60 s): one save per 60 s of training or more.

    python benchmarks/checkpoint_cost.py --data-dir ../shared/data [--epochs 4] [--json out.json]

Each epoch but the last saves (``every`` set to save at every boundary); the saves are timed
around the engine's own save step (``tauopt.engine._loop._Run.save``), so the figure holds the
building of the states too, not only the file writes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from _machine import JSON_HELP, machine, result_path

from tauopt.engine import RunState, TrainConfig, _loop, load_dataset, train, train_population
from tauopt.study._resume import TrialIdentity, TrialStates, config_hash, dataset_hash

DEFAULT_EVERY = 60.0


class _Files:
    """The study's saving, as a worker does it: one file per member in a folder."""

    def __init__(self, folder: Path, configs: list[TrainConfig], digest: str) -> None:
        self.states = TrialStates(folder, print)
        self.identities = [
            TrialIdentity("bench", f"{i:032x}", i, config_hash(c, digest, False))
            for i, c in enumerate(configs)
        ]
        self.every = 1e-9
        self.bytes = 0

    def stop_in(self) -> float | None:
        return None

    def save(self, states: Mapping[int, RunState]) -> None:
        for index, state in states.items():
            identity = self.identities[index]
            self.states.save(identity, state)
            self.bytes = max(self.bytes, self.states.path(identity.run_key).stat().st_size)


def _timed_saves() -> list[float]:
    seconds: list[float] = []
    original = _loop._Run.save

    def save(self: Any, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        original(self, *args, **kwargs)
        seconds.append(time.perf_counter() - start)

    _loop._Run.save = save  # type: ignore[method-assign]
    return seconds


def _configs(k: int, epochs: int) -> list[TrainConfig]:
    lrs = [0.01 * 1.3**i for i in range(k)]
    common = {"epochs": epochs, "data_seed": 0, "l1": 0.001, "prune_eps": 0.05}
    return [TrainConfig(seed=i, lr=lr, **common) for i, lr in enumerate(lrs)]


def measure(k: int, epochs: int, data_dir: Path) -> dict[str, Any]:
    dataset = load_dataset("mnist", data_dir, download=False)
    configs = _configs(k, epochs)
    saves = _timed_saves()
    with tempfile.TemporaryDirectory() as tmp:
        files = _Files(Path(tmp), configs, dataset_hash(dataset))
        if k == 1:
            results = [train(configs[0], dataset, device="cpu", checkpoints=files)]
        else:
            results = train_population(configs, dataset, device="cpu", checkpoints=files)
    # a member's epoch_seconds is the group's epoch time shared out: the group's is the sum
    per_epoch = statistics.median(
        sum(r.history.epoch_seconds[e] for r in results if not isinstance(r, Exception))
        for e in range(epochs)
    )
    save = statistics.median(saves)
    return {
        "k": k,
        "epochs": epochs,
        "saves": len(saves),
        "save_seconds": [round(s, 4) for s in saves],
        "save_seconds_median": round(save, 4),
        "epoch_seconds_median": round(per_epoch, 3),
        "file_bytes": files.bytes,
        "one_save_share_of_an_epoch": round(save / per_epoch, 5),
        # at the default, one save after every 60 s of training (the first epoch boundary past
        # them): the share of the training time is at most save / 60 s
        "share_at_default": round(save / max(DEFAULT_EVERY, per_epoch), 6),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--json", type=Path, help=JSON_HELP)
    args = parser.parse_args()
    args.json = args.json or result_path(__file__)
    torch.set_num_threads(1)
    summary = {
        **machine(),
        "threads": 1,
        "default_checkpoint_seconds": DEFAULT_EVERY,
        "runs": [measure(k, args.epochs, args.data_dir) for k in (1, 12)],
    }
    print(json.dumps(summary, indent=1))
    args.json.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
