"""Time one MNIST training epoch: tauopt's engine against a loop like the authors' code.

Both train the same network (same seed, so the same initial weights) on the same 50,000
training images with SGD, lr 0.01, batch 100. The straightforward loop reads the torchvision
dataset through ``ToTensor`` and ``DataLoader(batch_size=100, shuffle=True)`` and computes the
forward pass formula by formula (:func:`models.reference_forward`). A third variant runs the
same DataLoader loop with tauopt's fused network, to show what the data pipeline alone costs.
Both sides time the training pass of one epoch (the engine's full epoch, with its validation
pass and pruning check, is reported too). Also reported: the engine on one thread (on a GPU:
the engine without CUDA graphs), and the bare matrix products of an epoch of engine steps (on
the CPU the floor no engine can beat; on a GPU they are launched one by one, which a graph
avoids). With ``--device cuda`` both sides train on the GPU (the loop moves each batch there).
Runs are interleaved so that drifting machine speed hits every variant alike; medians are
reported. Usage::

    python benchmarks/epoch_speed.py --data-dir ../shared/data [--repeats 3] [--json out.json]
        [--device cuda]
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _machine import JSON_HELP, result_path
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from tauopt.engine import (
    RawDataset,
    TrainConfig,
    accuracy,
    build_model,
    load_dataset,
    make_splits,
    resolve_device,
    train,
)
from tauopt.engine._data import SPLIT_SEED
from tauopt.models import TauNetwork, reference_forward


def torchvision_root(data_dir: Path, into: Path) -> Path:
    """torchvision's MNIST wants the uncompressed IDX files: write them to a scratch root."""
    raw = into / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for src in (data_dir / "MNIST" / "raw").iterdir():
        target = raw / src.name.removesuffix(".gz")
        if src.suffix == ".gz":
            with gzip.open(src, "rb") as fin, open(target, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        else:
            shutil.copyfile(src, target)
    return into


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a timer stopped next measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop_epoch(
    model: TauNetwork,
    forward: Callable[[torch.Tensor], torch.Tensor],
    loader: DataLoader[Any],
    lr: float,
    device: torch.device,
) -> float:
    """One epoch the straightforward way (each batch moved to ``device``); its seconds."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    synchronize(device)
    start = time.perf_counter()
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(forward(images.view(images.shape[0], -1)), labels)
        loss.backward()
        optimizer.step()
        model.project_taus_()
    synchronize(device)
    return time.perf_counter() - start


def matmul_floor(
    config: TrainConfig, batches: int, device: torch.device, repeats: int = 200
) -> float:
    """Seconds per epoch of the bare matrix products of the engine's step (forward, backward
    recursion, weight gradients), with nothing else: what no engine on this device can beat."""
    depth, width, batch = config.depth, config.width, config.batch_size

    def empty(*size: int) -> torch.Tensor:
        return torch.empty(size, device=device)

    x = torch.rand(batch, 784, device=device)
    weights = [torch.randn(width, 784, device=device)] + [
        torch.randn(width, width, device=device) for _ in range(depth - 1)
    ]
    weights_t = [w.t() for w in weights]
    acts, grads = empty(depth, batch, width), empty(depth, batch, width)
    act_views, grad_views = acts.unbind(), grads.unbind()
    grad_w0, grad_hidden = empty(width, 784), empty(depth - 1, width, width)

    def products() -> None:
        inp = x
        for layer in range(depth):
            inp = torch.mm(inp, weights_t[layer], out=act_views[layer])
        for layer in range(depth - 1, 0, -1):
            torch.addmm(
                grad_views[layer], grad_views[layer], weights[layer], out=grad_views[layer - 1]
            )
        torch.mm(grads[0].t(), x, out=grad_w0)
        torch.bmm(grads[1:].transpose(1, 2), acts[:-1], out=grad_hidden)

    for _ in range(20):
        products()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        products()
    synchronize(device)
    return (time.perf_counter() - start) / repeats * batches


def one_thread_epoch(config: TrainConfig, dataset: RawDataset) -> float:
    """The engine's training pass on one CPU thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(config, dataset, device="cpu").train_seconds[0]
    finally:
        torch.set_num_threads(threads)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu"


def run(data_dir: Path, repeats: int, scratch: Path, device: torch.device) -> dict[str, Any]:
    dataset = load_dataset("mnist", data_dir, download=False)
    tv = datasets.MNIST(
        str(torchvision_root(data_dir, scratch)), train=True, transform=transforms.ToTensor()
    )
    order = torch.randperm(len(tv), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train_idx = order[10_000:].tolist()  # the engine's training split: same images, both sides
    splits = make_splits(dataset, val_size=10_000, train_size=None, device=device)
    results: dict[str, Any] = {
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": describe(device),
    }
    on_cpu = device.type == "cpu"
    if not on_cpu:  # the first CUDA calls initialise the libraries: keep that out of the times
        train(TrainConfig(epochs=1, train_size=2000, seed=0), dataset, device=device)
    for arch in ("resnet", "fracdnn"):
        config = TrainConfig(arch=arch, epochs=1, seed=0)  # the papers' defaults otherwise
        batches = len(train_idx) // config.batch_size
        times: dict[str, list[float]] = {
            "engine": [],
            "engine_with_validation": [],
            "loop": [],
            "loop_fused": [],
            "matmul_floor": [],
        }
        if on_cpu:
            times["engine_one_thread"] = []
        else:
            times["engine_no_graphs"] = []
        acc: dict[str, float] = {}
        for rep in range(repeats):
            result = train(config, dataset, device=device)
            times["engine"].append(
                result.history.train_seconds[0]
            )  # the training pass, as the loop's
            times["engine_with_validation"].append(result.history.epoch_seconds[0])
            acc["engine"] = result.test_accuracy
            if on_cpu:
                times["engine_one_thread"].append(one_thread_epoch(config, dataset))
            else:
                eager = train(config, dataset, device=device, cuda_graphs=False)
                times["engine_no_graphs"].append(eager.history.train_seconds[0])
            times["matmul_floor"].append(matmul_floor(config, batches, device))
            for variant in ("loop", "loop_fused"):
                model = build_model(config, 784, 10).to(device)
                forward = (
                    model
                    if variant == "loop_fused"
                    else (lambda x, m=model: reference_forward(m, x))
                )
                torch.manual_seed(rep)  # the DataLoader's shuffling
                loader = DataLoader(Subset(tv, train_idx), batch_size=100, shuffle=True)
                times[variant].append(loop_epoch(model, forward, loader, config.lr, device))
                if variant == "loop":
                    acc["loop"] = accuracy(model, splits.test_x, splits.test_y)
            print(
                f"{arch} repeat {rep + 1}/{repeats}: "
                + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
                flush=True,
            )
        median = {k: statistics.median(v) for k, v in times.items()}
        results[arch] = {
            "seconds": times,
            "median_seconds": median,
            "engine_fraction_of_loop": median["engine"] / median["loop"],
            "speedup": median["loop"] / median["engine"],
            "test_accuracy_after_one_epoch": acc,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help=JSON_HELP)
    parser.add_argument(
        "--device", default="cpu", help="cpu (default; the issue's target) or cuda[:N]"
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    args.json = args.json or result_path(__file__, str(device))
    with tempfile.TemporaryDirectory() as scratch:
        results = run(args.data_dir, args.repeats, Path(scratch), device)
    for arch in ("resnet", "fracdnn"):
        r = results[arch]
        m = r["median_seconds"]
        if "engine_one_thread" in m:
            one_thread = f"{m['engine_one_thread']:.2f}s on one thread; "
        else:
            one_thread = f"{m['engine_no_graphs']:.2f}s without CUDA graphs; "
        print(
            f"{arch} on {results['device']}: engine {m['engine']:.2f}s "
            f"({m['engine_with_validation']:.2f}s with validation, "
            f"{one_thread}bare matrix products {m['matmul_floor']:.3f}s), "
            f"loop {m['loop']:.2f}s, loop+fused model "
            f"{m['loop_fused']:.2f}s -> engine = 1/{r['speedup']:.1f} of the loop; test accuracy "
            f"engine {r['test_accuracy_after_one_epoch']['engine']:.4f} vs loop "
            f"{r['test_accuracy_after_one_epoch']['loop']:.4f}"
        )
    args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
