"""What a larger input costs: one epoch of the reference networks on CIFAR-shaped data
(3 x 32 x 32 = 3,072 inputs, generated) against MNIST (784 inputs, the real files), alone and
as a population of K members, interleaved so that drifting machine speed hits both alike.

    python benchmarks/input_size.py --data-dir ../shared/data [--repeats 3] [--k 8] [--json out]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _machine import JSON_HELP, machine, result_path

from tauopt.engine import RawDataset, TrainConfig, load_dataset, train, train_population
from tauopt.engine._data import ImageSet


def cifar_shaped(n_train: int, n_test: int) -> RawDataset:
    """Random uint8 images of CIFAR's shape and ten classes (only the sizes matter here)."""
    gen = torch.Generator().manual_seed(0)

    def part(n: int) -> ImageSet:
        images = torch.randint(0, 256, (n, 3072), dtype=torch.uint8, generator=gen)
        return ImageSet(images, torch.randint(0, 10, (n,), generator=gen))

    return RawDataset("cifar10", part(n_train), part(n_test), 10, (3, 32, 32))


def member_epoch_seconds(configs: list[TrainConfig], dataset: RawDataset) -> float:
    """Wall seconds per member of one run of ``configs`` (alone if one, else a population)."""
    start = time.perf_counter()
    if len(configs) == 1:
        train(configs[0], dataset, device="cpu")
    else:
        train_population(configs, dataset, device="cpu")
    return (time.perf_counter() - start) / len(configs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=10_000)
    parser.add_argument("--json", type=Path, help=JSON_HELP)
    args = parser.parse_args()
    args.json = args.json or result_path(__file__)
    datasets = {"mnist": load_dataset("mnist", args.data_dir, download=False)}
    datasets["cifar-shaped"] = cifar_shaped(args.train_size + 1_000, 2_000)
    rows: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, dataset in datasets.items():
            for arch in ("resnet", "fracdnn"):
                base = TrainConfig(
                    arch=arch,  # type: ignore[arg-type]
                    dataset=dataset.name,
                    epochs=1,
                    train_size=args.train_size,
                    val_size=1_000,
                    data_seed=0,
                )
                members = [base.replace(seed=s, lr=0.01 * (s + 1)) for s in range(args.k)]
                for label, configs in (("alone", [base]), (f"K={args.k}", members)):
                    key = f"{name} {arch} {label}"
                    rows.setdefault(key, []).append(member_epoch_seconds(configs, dataset))
                    print(f"{key}: {rows[key][-1]:.3f} s per member-epoch", flush=True)
    medians = {k: statistics.median(v) for k, v in rows.items()}
    for arch in ("resnet", "fracdnn"):
        for label in ("alone", f"K={args.k}"):
            ratio = medians[f"cifar-shaped {arch} {label}"] / medians[f"mnist {arch} {label}"]
            print(f"{arch} {label}: CIFAR-shaped / MNIST = {ratio:.2f}")
    args.json.write_text(
        json.dumps(
            {
                **machine(),
                "threads": torch.get_num_threads(),
                "train_size": args.train_size,
                "k": args.k,
                "seconds_per_member_epoch": rows,
                "medians": medians,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
