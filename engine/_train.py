"""The training engine: whole dataset on the device, batches by index, no per-sample work.

Nothing here is global: a call of :func:`train` owns its model, optimiser and generator, so a
worker process can run many trials one after another on the dataset it loaded once. The epoch
loop is :func:`tauopt.engine._loop.run_epochs`; :class:`NetworkStepper` steps one network.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm import tqdm

from tauopt.engine._config import TrainConfig
from tauopt.engine._data import RawDataset, Splits, make_splits
from tauopt.engine._loop import (
    EpochPass,
    EpochStats,
    LoopOptions,
    RunRecord,
    Stepper,
    TrainResult,
    run_epochs,
)
from tauopt.engine._population_step import PopulationStepper
from tauopt.engine._state import Checkpointing, RunState, network_state, restore_network
from tauopt.engine._step import GraphedTrainStep, TrainStep
from tauopt.errors import ConfigError
from tauopt.models import FractionalDNN, TauNetwork, TauPopulation, TauResNet


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


#: More threads than this are no machine's: 100,000 crash the process (OpenMP), 1,024 run.
MAX_THREADS = 1024


def set_threads(threads: int | None) -> None:
    """CPU threads for this process's tensor work (``None``: torch's default, every core).

    Several workers on one machine should split the cores between them: each one left at
    every core oversubscribes the CPU, and an epoch can take ten times longer.
    """
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise ConfigError(f"threads must be an integer in [1, {MAX_THREADS}], got {threads!r}")
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
        # the data's share (the first layer's inputs, the last one's classes) blamed where it
        # is most of the network
        data = in_features * w + w * num_classes
        fix = (
            f"the data's {in_features:,} features and {num_classes:,} classes make most of "
            "it: use a dataset with fewer"
            if data > params / 2
            else "lower --width or --depth"
        )
        raise ConfigError(
            f"width {w} and depth {d} need about {need / 2**30:.1f} GiB to train, more than the "
            f"{have / 2**30:.1f} GiB of memory of {device}; {fix}"
        )


def build_model(config: TrainConfig, in_features: int, num_classes: int) -> TauNetwork:
    """The network of ``config``, initialised from ``config.seed`` without touching global RNG
    (with ``normalize``, standardising its inputs by placeholders: set the statistics)."""
    common: dict[str, Any] = {
        "T": config.T,
        "trainable_tau": not config.fixed_tau,
        "fixed_input_tau": config.fixed_input_tau,
        "dependent_last_tau": config.dependent_last_tau,
        "projected_last_tau": config.projected_last_tau,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model: TauNetwork
        if config.arch == "resnet":
            model = TauResNet(in_features, config.width, config.depth, num_classes, **common)
        else:
            model = FractionalDNN(
                in_features,
                config.width,
                config.depth,
                num_classes,
                gamma=config.gamma,
                tau_min=config.tau_min,
                detach_memory=config.detach_memory,
                **common,
            )
    if config.normalize:  # placeholders until the training split's statistics are set
        model.standardize_inputs(torch.zeros(in_features), torch.ones(in_features))
    return model


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


def _make_step(
    model: TauNetwork, optimizer: PlainSGD, splits: Splits, config: TrainConfig, graphs: bool
) -> TrainStep:
    x, y, l1, horizon = splits.train_x, splits.train_y, config.l1, config.horizon_weight
    if graphs and x.device.type == "cuda":
        return GraphedTrainStep(
            model, optimizer, x, y, l1=l1, horizon_weight=horizon, batch_size=config.batch_size
        )
    return TrainStep(model, optimizer, x, y, l1=l1, horizon_weight=horizon)


class NetworkStepper:
    """One network's run, stepped by the fused step of :mod:`tauopt.engine._step` (replayed
    from a CUDA graph on a GPU unless ``cuda_graphs`` is false)."""

    def __init__(
        self, model: TauNetwork, config: TrainConfig, splits: Splits, *, cuda_graphs: bool
    ) -> None:
        self.model, self.config, self.splits = model, config, splits
        self.cuda_graphs = cuda_graphs
        self.optimizer = make_optimizer(model, config)

    @property
    def depth(self) -> int:
        return self.model.depth

    def train_epoch(
        self,
        order: torch.Tensor,
        bar: tqdm[Any],
        *,
        start: int = 0,
        sums: Sequence[tuple[float, float]] | None = None,
        pause: Callable[[int], bool] = lambda done: False,
    ) -> EpochPass:
        step = _make_step(self.model, self.optimizer, self.splits, self.config, self.cuda_graphs)
        if sums is not None:  # float32 sums, exact as Python floats
            step.total.fill_(sums[0][0])
            step.clean.fill_(sums[0][1])
        # Batches are gathered by index from the resident tensors: a batch-sized copy per step
        # is cheaper than shuffling the whole 150 MB training tensor once per epoch.
        batches = order.to(step.x.device).split(self.config.batch_size)
        done = start
        for idx in batches[start:]:
            step(idx)
            done += 1
            if (done - start) % 50 == 0:
                bar.update(50)
            if done < len(batches) and pause(done):
                return EpochPass(done, sums=[(float(step.total), float(step.clean))])
        bar.update((done - start) % 50)
        # one host round trip per epoch; the graph pins this epoch's buffers until then
        return EpochPass(done, [float(step.total) / done], [float(step.clean) / done])

    def state(self, position: int) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        return network_state(self.model, self.model.block_ids), None

    def taus(self, position: int) -> list[float]:
        values: list[float] = self.model.taus.detach().cpu().tolist()
        return values

    def block_ids(self, position: int) -> list[int]:
        return list(self.model.block_ids)

    def network(self, position: int) -> TauNetwork:
        return self.model

    def prune(self, position: int, eps: float, rule: str) -> list[int]:
        if not isinstance(self.model, TauResNet):
            return []
        removed = self.model.prune(eps, rule)
        if removed:
            self.optimizer = make_optimizer(self.model, self.config)
        return removed

    def keep(self, positions: list[int]) -> None:
        """One member: nothing to repack."""


def _standardized(model: TauNetwork, splits: Splits) -> TauNetwork:
    if splits.mean is not None and splits.std is not None:
        model.standardize_inputs(splits.mean, splits.std)
    return model


def check_resumes(config: TrainConfig, state: RunState) -> None:
    """Refuse to go on from the state of another run (a caller's mistake: a study checks
    what it loads before it gets here)."""
    if state.config != config:
        raise ValueError(f"a state of another run: {state.config} is not {config}")


def check_state(state: RunState, in_features: int, num_classes: int) -> None:
    """Whether a run can go on from ``state`` (a state read from a file may be of another
    shape or damaged): its network, its slots and its batch order are restored once on the
    CPU, and ``ValueError`` (or what torch raises: ``RuntimeError``, ``KeyError``...) says why
    not."""
    config = state.config
    torch.Generator().set_state(state.order)
    restore_network(build_model(config, in_features, num_classes), state.network)
    if state.slots is not None:
        member = build_model(config, in_features, num_classes)
        TauPopulation([member]).load_slots_([state.slots])
    if state.sums is not None and not all(math.isfinite(v) for v in state.sums):
        raise ValueError(f"loss sums {state.sums} are not finite")


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
    resume: RunState | None = None,
    checkpoints: Checkpointing | None = None,
) -> TrainResult:
    """Train the network of ``config`` on ``dataset``; see :class:`TrainResult`.

    On a CUDA device the training step is replayed from a CUDA graph (see
    :mod:`tauopt.engine._step`) unless ``cuda_graphs`` is false; the CPU always runs it eagerly.
    With ``precision="bfloat16"`` the network trains as a population of one, whose step
    rounds its products' operands (see :class:`tauopt.models.TauPopulation`): the same step
    that its trial takes in a population of many (eagerly, also on a GPU).

    ``progress`` writes to stderr a line per epoch and, on a terminal, a bar during each
    epoch; ``label`` starts both (a worker names its trial there).

    ``test_every_epoch`` also measures test accuracy after every epoch, for learning curves;
    model selection never sees it.

    ``on_epoch`` is called after every epoch (after pruning); it may raise to stop the run,
    which is how a study prunes an unpromising trial: the run then raises
    :class:`~tauopt.engine._loop.RunStoppedError`, which holds what ``on_epoch`` raised and the
    run as far as it got. Raises :class:`DivergedError` when the loss or a step size stops
    being finite.

    ``resume`` goes on from a saved state of this config's run (see
    :class:`tauopt.engine._state.RunState`); ``checkpoints`` takes the run's states as it
    trains and may ask it to stop, which raises :class:`~tauopt.engine._state.RunPausedError`.
    On the same device and thread count a run that goes on from a state of its own stepper
    gives the very result of a run trained in one go.
    """
    if dataset.name != config.dataset:
        raise ConfigError(f"config asks for {config.dataset!r} but {dataset.name!r} was loaded")
    config = config.for_training_split(len(dataset.train))
    dev = resolve_device(device)
    check_fits(config, dataset.in_features, dataset.num_classes, dev)
    splits = make_splits(
        dataset,
        val_size=config.held_out,
        train_size=config.train_size,
        device=dev,
        normalize=config.normalize,
        seed=config.split_order,
    )
    model = build_model(config, dataset.in_features, dataset.num_classes)
    record = RunRecord(config, model.num_active_params())
    if resume is not None:
        check_resumes(config, resume)
        record = RunRecord.from_state(resume)
    stepper: Stepper
    if config.precision == "float32":
        if resume is not None:
            restore_network(model, resume.network)
        model = _standardized(model.to(dev), splits)
        stepper = NetworkStepper(model, config, splits, cuda_graphs=cuda_graphs)
    else:
        model = _standardized(model.to(dev), splits)
        states = None if resume is None else [resume]
        stepper = PopulationStepper([config], [model], splits, states=states)
    options = LoopOptions(
        on_epoch=None if on_epoch is None else lambda _, stats: on_epoch(stats),
        progress=progress,
        label=label,
        test_every_epoch=test_every_epoch,
        checkpoints=checkpoints,
    )
    (outcome,) = run_epochs(
        stepper, [record], splits, dev, options, None if resume is None else [resume]
    )
    if isinstance(outcome, Exception):
        raise outcome
    return outcome
