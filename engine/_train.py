"""The training engine: whole dataset on the device, batches by index, no per-sample work.

Nothing here is global: a call of :func:`train` owns its model, optimiser and generator, so a
worker process can run many trials one after another on the dataset it loaded once.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from tauopt.engine._config import TrainConfig
from tauopt.engine._data import RawDataset, Splits, make_splits
from tauopt.engine._step import GraphedTrainStep, TrainStep
from tauopt.errors import ConfigError, DivergedError
from tauopt.models import FractionalDNN, TauNetwork, TauResNet

_EVAL_CHUNK = 10_000


@dataclass(frozen=True)
class PruneEvent:
    """Block ``block`` (original numbering) was removed after ``epoch`` from ``position``."""

    epoch: int
    position: int
    block: int


@dataclass(frozen=True)
class EpochStats:
    """What a caller sees after each epoch (for example to report to an Optuna trial)."""

    epoch: int
    val_accuracy: float
    train_loss: float
    active_blocks: int
    active_params: int


@dataclass(frozen=True)
class TrainResult:
    """Metrics of one finished run and the trained (possibly pruned) network."""

    config: TrainConfig
    device: str
    val_accuracy: list[float]
    test_accuracy: float
    train_loss: list[float]
    taus: list[float]
    tau_history: list[list[float]]
    active_blocks: int
    active_block_ids: list[int]
    active_params: int
    pruned: list[PruneEvent]
    epoch_seconds: list[float]
    train_seconds: list[float]
    model: TauNetwork = field(repr=False, compare=False)
    #: Parameters of the network before any pruning.
    initial_params: int = 0
    #: Test accuracy after every epoch (only with ``train(..., test_every_epoch=True)``).
    test_accuracy_history: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready metrics (the network itself is left out)."""
        return {
            "config": self.config.to_dict(),
            "device": self.device,
            "val_accuracy": self.val_accuracy,
            "test_accuracy": self.test_accuracy,
            "train_loss": self.train_loss,
            "taus": self.taus,
            "tau_sum": sum(self.taus),
            "tau_history": self.tau_history,
            "active_blocks": self.active_blocks,
            "active_block_ids": self.active_block_ids,
            "active_params": self.active_params,
            "initial_params": self.initial_params,
            "test_accuracy_history": self.test_accuracy_history,
            "pruned": [vars(event) for event in self.pruned],
            "epoch_seconds": self.epoch_seconds,
            "train_seconds": self.train_seconds,
        }


@dataclass
class RunRecord:
    """What a run records epoch by epoch, and its :class:`TrainResult` once trained: one
    bookkeeping for :func:`train` and for every member of a population."""

    config: TrainConfig
    #: Parameters of the network before any pruning.
    initial_params: int
    val: list[float] = field(default_factory=list)
    test: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    history: list[list[float]] = field(default_factory=list)
    pruned: list[PruneEvent] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)

    def record_taus(self, block_ids: Sequence[int], taus: Sequence[float]) -> None:
        """The taus of the blocks ``block_ids``, over every original block (a pruned block's
        tau is exactly zero)."""
        full = [0.0] * self.config.depth
        for block, tau in zip(block_ids, taus, strict=True):
            full[block] = tau
        self.history.append(full)

    def result(self, model: TauNetwork, splits: Splits, device: torch.device) -> TrainResult:
        """The finished run of ``model``: the records, the test accuracy, the final taus."""
        return TrainResult(
            config=self.config,
            device=str(device),
            val_accuracy=self.val,
            test_accuracy=accuracy(model, splits.test_x, splits.test_y),
            train_loss=self.losses,
            taus=model.taus.detach().cpu().tolist(),
            tau_history=self.history,
            active_blocks=model.depth,
            active_block_ids=list(model.block_ids),
            active_params=model.num_active_params(),
            pruned=self.pruned,
            epoch_seconds=self.seconds,
            train_seconds=self.train_seconds,
            model=model,
            initial_params=self.initial_params,
            test_accuracy_history=self.test,
        )


def resolve_device(device: str | torch.device | None) -> torch.device:
    """CUDA when present, else CPU; an explicit choice is checked."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from e
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(
            f"device {device!r} is not supported (tauopt trains on cpu or cuda): use cpu, cuda "
            "or cuda:N"
        )
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} asked for, but no CUDA GPU is visible; use --device cpu"
        )
    return resolved


def set_threads(threads: int | None) -> None:
    """CPU threads for this process's tensor work (``None``: torch's default, every core).

    Several workers on one machine should split the cores between them: each one left at
    every core oversubscribes the CPU, and an epoch can take ten times longer.
    """
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be an integer >= 1, got {threads!r}")
    torch.set_num_threads(threads)


def _memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def parameter_count(config: TrainConfig, in_features: int, num_classes: int) -> int:
    """Parameters of the unpruned network of ``config`` (what its ``num_active_params()`` is
    before any block is removed), without building it."""
    w, d = config.width, config.depth
    taus = d - 1 if config.dependent_last_tau else d
    return in_features * w + w + (d - 1) * (w * w + w) + w * num_classes + taus


def check_fits(
    config: TrainConfig, in_features: int, num_classes: int, device: torch.device
) -> None:
    """Refuse, before allocating, a network whose training cannot fit in ``device``'s memory.

    Estimate: float32 weights, their gradients and the step's workspace (about three copies of
    the parameters), plus a batch's states and gradients for every block.
    """
    w, d = config.width, config.depth
    params = parameter_count(config, in_features, num_classes)
    need = 4 * (3 * params + 4 * config.batch_size * w * (d + 1))
    have = _memory_bytes(device)
    if need > have:
        raise ConfigError(
            f"width {w} and depth {d} need about {need / 2**30:.1f} GiB to train, more than the "
            f"{have / 2**30:.1f} GiB of memory of {device}; lower --width or --depth"
        )


def build_model(config: TrainConfig, in_features: int, num_classes: int) -> TauNetwork:
    """The network of ``config``, initialised from ``config.seed`` without touching global RNG."""
    common: dict[str, Any] = {
        "T": config.T,
        "trainable_tau": not config.fixed_tau,
        "dependent_last_tau": config.dependent_last_tau,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.arch == "resnet":
            return TauResNet(in_features, config.width, config.depth, num_classes, **common)
        return FractionalDNN(
            in_features,
            config.width,
            config.depth,
            num_classes,
            gamma=config.gamma,
            tau_min=config.tau_min,
            detach_memory=config.detach_memory,
            **common,
        )


class PlainSGD:
    """Plain SGD, ``p -= lr * grad``: the papers' optimiser, without torch.optim's per-step
    bookkeeping (hooks, profiler records, option lookups), which at this model size costs about
    as much as the update itself. Same arithmetic as ``torch.optim.SGD(params, lr)``.
    """

    def __init__(self, params: list[torch.nn.Parameter], lr: float) -> None:
        self.params = params
        self.lr = lr

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        with_grad: list[torch.Tensor] = [p for p in self.params if p.grad is not None]
        grads = [p.grad for p in with_grad if p.grad is not None]
        torch._foreach_add_(with_grad, grads, alpha=-self.lr)


def make_optimizer(model: TauNetwork, config: TrainConfig) -> PlainSGD:
    """The optimiser over the parameters the model trains now (call again after pruning)."""
    return PlainSGD([p for p in model.parameters() if p.requires_grad], config.lr)


@torch.inference_mode()
def accuracy(model: TauNetwork, x: torch.Tensor, y: torch.Tensor) -> float:
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for start in range(0, x.shape[0], _EVAL_CHUNK):
        logits = model(x[start : start + _EVAL_CHUNK])
        correct += (logits.argmax(1) == y[start : start + _EVAL_CHUNK]).sum()
    return float(correct) / x.shape[0]


def _make_step(
    model: TauNetwork, optimizer: PlainSGD, splits: Splits, config: TrainConfig, graphs: bool
) -> TrainStep:
    x, y, l1, horizon = splits.train_x, splits.train_y, config.l1, config.horizon_weight
    if graphs and x.device.type == "cuda":
        return GraphedTrainStep(
            model, optimizer, x, y, l1=l1, horizon_weight=horizon, batch_size=config.batch_size
        )
    return TrainStep(model, optimizer, x, y, l1=l1, horizon_weight=horizon)


def _train_epoch(
    step: TrainStep, config: TrainConfig, generator: torch.Generator, bar: tqdm[Any]
) -> float:
    """One pass over the shuffled training split; returns the mean training loss."""
    n = step.x.shape[0]
    # Batches are gathered by index from the resident tensors: a batch-sized copy per step is
    # cheaper than shuffling the whole 150 MB training tensor once per epoch.
    order = torch.randperm(n, generator=generator).to(step.x.device)
    batches = 0
    for idx in order.split(config.batch_size):
        step(idx)
        batches += 1
        if batches % 50 == 0:
            bar.update(50)
    bar.update(batches % 50)
    return float(step.total) / batches


def check_finite(epoch: int, loss: float, taus: list[float]) -> None:
    if not math.isfinite(loss):
        raise DivergedError(epoch, f"training loss is {loss}; lower the learning rate or T")
    if not all(math.isfinite(t) for t in taus):
        raise DivergedError(epoch, f"step sizes became non-finite: {taus}")


def train(
    config: TrainConfig,
    dataset: RawDataset,
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
    label: str = "",
    on_epoch: Callable[[EpochStats], None] | None = None,
    cuda_graphs: bool = True,
    test_every_epoch: bool = False,
) -> TrainResult:
    """Train the network of ``config`` on ``dataset``; see :class:`TrainResult`.

    On a CUDA device the training step is replayed from a CUDA graph (see
    :mod:`tauopt.engine._step`) unless ``cuda_graphs`` is false; the CPU always runs it eagerly.

    ``progress`` writes to stderr a line per epoch and, on a terminal, a bar during each
    epoch; ``label`` starts both (a worker names its trial there).

    ``test_every_epoch`` also measures test accuracy after every epoch, for learning curves;
    model selection never sees it.

    ``on_epoch`` is called after every epoch (after pruning); it may raise to stop the run,
    which is how a study prunes an unpromising trial. Raises :class:`DivergedError` when the
    loss or a step size stops being finite.
    """
    if dataset.name != config.dataset:
        raise ConfigError(f"config asks for {config.dataset!r} but {dataset.name!r} was loaded")
    dev = resolve_device(device)
    check_fits(config, dataset.in_features, dataset.num_classes, dev)
    splits = make_splits(
        dataset, val_size=config.val_size, train_size=config.train_size, device=dev
    )
    model = build_model(config, dataset.in_features, dataset.num_classes).to(dev)
    run = RunRecord(config, model.num_active_params())
    optimizer = make_optimizer(model, config)
    generator = torch.Generator().manual_seed(config.order_seed)
    n_batches = math.ceil(splits.train_x.shape[0] / config.batch_size)
    prefix = f"{label} " if label else ""
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        with tqdm(
            total=n_batches,
            desc=f"{prefix}epoch {epoch}/{config.epochs}",
            # Not on a log file: a bar redrawn with carriage returns is noise there.
            disable=not (progress and sys.stderr.isatty()),
            file=sys.stderr,
            leave=False,
        ) as bar:
            step = _make_step(model, optimizer, splits, config, cuda_graphs)
            loss = _train_epoch(step, config, generator, bar)
            del step  # a graph pins the buffers of this epoch's network
        run.train_seconds.append(time.perf_counter() - start)
        run.val.append(accuracy(model, splits.val_x, splits.val_y))
        if test_every_epoch:
            run.test.append(accuracy(model, splits.test_x, splits.test_y))
        taus = model.taus.detach().cpu().tolist()
        check_finite(epoch, loss, taus)
        run.record_taus(model.block_ids, taus)
        if (
            config.prune_eps is not None
            and isinstance(model, TauResNet)
            and epoch % config.prune_every == 0
        ):
            ids = list(model.block_ids)
            removed = model.prune(config.prune_eps)
            if removed:
                run.pruned += [PruneEvent(epoch, pos, ids[pos]) for pos in removed]
                optimizer = make_optimizer(model, config)
        run.seconds.append(time.perf_counter() - start)
        run.losses.append(loss)
        if progress:
            print(
                f"{prefix}epoch {epoch}/{config.epochs}: loss {loss:.4f}, "
                f"val accuracy {run.val[-1]:.4f}, {model.depth} blocks, {run.seconds[-1]:.2f}s",
                file=sys.stderr,
                flush=True,
            )
        if on_epoch is not None:
            on_epoch(EpochStats(epoch, run.val[-1], loss, model.depth, model.num_active_params()))
    return run.result(model, splits, dev)
