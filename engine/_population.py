"""Population training: several runs of one shape trained together, in lockstep.

The members of a group share the architecture, the data and its order (``group_key``); each
keeps its own initialisation, learning rate, penalties, horizon, fractional order and pruning
threshold. Every member's result equals what :func:`train` gives for its config alone, to
float tolerance (the batched products sum in another order): same batches, same updates, the
same pruning decisions, and the evaluation runs on the member's own network.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

from tauopt.engine._config import TrainConfig
from tauopt.engine._data import RawDataset, Splits, make_splits
from tauopt.engine._train import (
    EpochStats,
    PruneEvent,
    RunRecord,
    TrainResult,
    accuracy,
    build_model,
    check_finite,
    check_fits,
    parameter_count,
    resolve_device,
    train,
)
from tauopt.errors import ConfigError, DivergedError
from tauopt.models import TauNetwork, TauPopulation

#: What members of one group must share; everything else is per member (the architecture
#: too: a ResNet is the fractional stack without memory, see ``tauopt.models.TauPopulation``).
_SHARED = (
    "dataset",
    "epochs",
    "width",
    "depth",
    "batch_size",
    "train_size",
    "val_size",
    "fixed_tau",
    "detach_memory",
    "prune_every",
)


def group_key(config: TrainConfig) -> tuple[object, ...]:
    """Configs with equal keys can train as one population."""
    return (*(getattr(config, name) for name in _SHARED), config.order_seed)


@dataclass
class _Member(RunRecord):
    index: int = field(kw_only=True)  # the config's position in the call
    #: The member's own network, updated from the population each epoch.
    network: TauNetwork = field(kw_only=True)


#: Fewer members than this train alone. Measured on a 2-core CPU (reference size, per member
#: and step, against each network's own step; ``benchmarks/population_step.py``): two batched
#: members are slower than each alone (0.69-0.93x), four about level or better (1.0-1.3x),
#: sixteen 1.5-1.7x for ResNets, fractional networks and mixed groups alike.
MIN_BATCH = 4


def train_population(
    configs: Sequence[TrainConfig],
    dataset: RawDataset,
    *,
    device: str | torch.device | None = None,
    on_epoch: Callable[[int, EpochStats], None] | None = None,
    progress: bool = False,
    label: str = "",
    test_every_epoch: bool = False,
) -> list[TrainResult | Exception]:
    """Train every config of ``configs`` (all with one :func:`group_key`) as one population
    (ResNets and fractional networks together, or apart where both sides are large enough and
    the ResNets may prune: see :func:`_parts`) where there are at least :data:`MIN_BATCH` of
    them, else each alone with :func:`train`.

    Returns, per config in order, its :class:`TrainResult`, or the exception that ended it:
    :class:`DivergedError` when its loss or a step size stopped being finite, or whatever
    ``on_epoch(index, stats)`` raised for it (a study's pruner stops a member that way). Such a
    member leaves the group and the others go on. A ``BaseException`` that is not an
    ``Exception`` (a stop signal) ends the whole call.

    An epoch's time is shared out: each member's ``epoch_seconds`` is the group's epoch time
    divided by the members trained in it.
    """
    if not configs:
        return []
    keys = {group_key(c) for c in configs}
    if len(keys) > 1:
        raise ConfigError("a population's configs must agree on " + ", ".join(_SHARED))
    if dataset.name != configs[0].dataset:
        raise ConfigError(f"config asks for {configs[0].dataset!r} but {dataset.name!r} was loaded")
    outcome: dict[int, TrainResult | Exception] = {}
    parts = _parts(configs)
    for part in parts:
        relay = None if on_epoch is None else partial(_relay, on_epoch, part)
        if len(part) >= MIN_BATCH:
            arch = configs[part[0]].arch
            results = _train_together(
                [configs[i] for i in part],
                dataset,
                dev=resolve_device(device),
                on_epoch=relay,
                label=f"{label} ({arch} members)".strip() if len(parts) > 1 else label,
                progress=progress,
                test_every_epoch=test_every_epoch,
            )
            outcome.update(zip(part, results, strict=True))
            continue
        for index in part:
            try:
                outcome[index] = train(
                    configs[index],
                    dataset,
                    device=device,
                    on_epoch=None if on_epoch is None else partial(on_epoch, index),
                    progress=progress,
                    label=_alone_label(label, index, len(configs)),
                    test_every_epoch=test_every_epoch,
                )
            except Exception as e:  # this member's end; the others go on
                outcome[index] = e
    return [outcome[i] for i in range(len(configs))]


def _parts(configs: Sequence[TrainConfig]) -> list[list[int]]:
    """The configs (indices) that train as one population each: ResNets that may prune apart
    from fractional networks where each side fills a population of its own (a fractional
    block is never pruned, so beside one the stack cannot shrink when ResNets prune; apart,
    16 default-study trials took 0.91-1.01 of one mixed population's time, with the same
    results: ``benchmarks/population_groups.py``); else all together."""
    resnets = [i for i, c in enumerate(configs) if c.arch == "resnet"]
    others = [i for i, c in enumerate(configs) if c.arch != "resnet"]
    prunes = any(configs[i].prune_eps is not None for i in resnets)
    if prunes and len(resnets) >= MIN_BATCH and len(others) >= MIN_BATCH:
        return [resnets, others]
    return [list(range(len(configs)))]


def _relay(
    on_epoch: Callable[[int, EpochStats], None], part: list[int], index: int, stats: EpochStats
) -> None:
    on_epoch(part[index], stats)


def _alone_label(label: str, index: int, size: int) -> str:
    return label if size == 1 else f"{label} (member {index + 1} of {size}, alone)".strip()


def _train_together(
    configs: Sequence[TrainConfig],
    dataset: RawDataset,
    *,
    dev: torch.device,
    on_epoch: Callable[[int, EpochStats], None] | None,
    progress: bool,
    label: str,
    test_every_epoch: bool,
) -> list[TrainResult | Exception]:
    first = configs[0]
    for config in configs:  # K members hold K batches' states at once
        batch = config.batch_size * len(configs)
        check_fits(config.replace(batch_size=batch), dataset.in_features, dataset.num_classes, dev)
    splits = make_splits(dataset, val_size=first.val_size, train_size=first.train_size, device=dev)
    shape = (dataset.in_features, dataset.num_classes)
    members = [
        _Member(c, parameter_count(c, *shape), index=i, network=build_model(c, *shape).to(dev))
        for i, c in enumerate(configs)
    ]
    population = TauPopulation([m.network for m in members])
    outcome: dict[int, TrainResult | Exception] = {}
    generator = torch.Generator().manual_seed(first.order_seed)
    for epoch in range(1, first.epochs + 1):
        start = time.perf_counter()
        losses = _train_epoch(population, members, splits, generator)
        trained = len(members)
        train_seconds = (time.perf_counter() - start) / trained
        left = _end_epoch(population, members, splits, epoch, losses, outcome, test_every_epoch)
        seconds = (time.perf_counter() - start) / trained
        for member in left:
            member.train_seconds.append(train_seconds)
            member.seconds.append(seconds)
        left = _report(left, epoch, on_epoch, outcome)
        # Repack: members that left and blocks that were pruned stop costing anything (the
        # stack shrinks to the member with the most blocks left).
        kept = [members.index(m) for m in left]
        if kept and (len(kept) < len(members) or population.packed_depth(kept) < population.depth):
            population.keep(kept)
        if progress:
            took = seconds * trained
            _print_progress(label, epoch, first.epochs, members, left, population.depth, took)
        members = left
        if not members:
            break
    for member in members:
        outcome[member.index] = member.result(member.network, splits, dev)
    return [outcome[i] for i in range(len(configs))]


def _step_coefficients(members: Sequence[_Member], device: torch.device) -> list[torch.Tensor]:
    def column(name: str) -> torch.Tensor:
        return torch.tensor([getattr(m.config, name) for m in members], device=device)

    return [column("lr"), column("l1"), column("horizon_weight")]


def _train_epoch(
    population: TauPopulation,
    members: Sequence[_Member],
    splits: Splits,
    generator: torch.Generator,
) -> torch.Tensor:
    """One pass over the shuffled training split, as the single engine batches it; returns the
    mean training loss of every member."""
    x, y = splits.train_x, splits.train_y
    lr, l1, horizon = _step_coefficients(members, x.device)
    total = torch.zeros(len(members), device=x.device)
    order = torch.randperm(x.shape[0], generator=generator).to(x.device)
    batches = 0
    for idx in order.split(members[0].config.batch_size):
        xb, yb = x.index_select(0, idx), y.index_select(0, idx)
        total += population.sgd_step_(xb, yb, lr=lr, l1=l1, horizon_weight=horizon)
        batches += 1
    return total / batches


def _end_epoch(
    population: TauPopulation,
    members: list[_Member],
    splits: Splits,
    epoch: int,
    losses: torch.Tensor,
    outcome: dict[int, TrainResult | Exception],
    test_every_epoch: bool,
) -> list[_Member]:
    """Evaluate, check and prune every member, as :func:`train` does after an epoch; returns
    the members that go on (a diverged one is recorded in ``outcome``)."""
    left = []
    taus_all = population.taus().detach().cpu().tolist()
    for position, member in enumerate(members):
        loss, taus = float(losses[position]), taus_all[position]
        active = population.active[position].tolist()
        own = [t for t, on in zip(taus, active, strict=True) if on]
        try:
            check_finite(epoch, loss, own)
        except DivergedError as e:
            outcome[member.index] = e
            continue
        population.export(position, member.network)
        member.val.append(accuracy(member.network, splits.val_x, splits.val_y))
        if test_every_epoch:
            member.test.append(accuracy(member.network, splits.test_x, splits.test_y))
        ids_before = population.member_block_ids(position)
        member.record_taus(ids_before, own)
        member.losses.append(loss)
        eps, every = member.config.prune_eps, member.config.prune_every
        if eps is not None and member.config.arch == "resnet" and epoch % every == 0:
            for stack_position in population.prune(position, eps):
                block = population.block_ids[position][stack_position]
                member.pruned.append(PruneEvent(epoch, ids_before.index(block), block))
            population.export(position, member.network)
        left.append(member)
    return left


def _report(
    members: list[_Member],
    epoch: int,
    on_epoch: Callable[[int, EpochStats], None] | None,
    outcome: dict[int, TrainResult | Exception],
) -> list[_Member]:
    if on_epoch is None:
        return members
    left = []
    for member in members:
        net = member.network
        stats = EpochStats(
            epoch, member.val[-1], member.losses[-1], net.depth, net.num_active_params()
        )
        try:
            on_epoch(member.index, stats)
        except Exception as e:  # the caller stops this member (a pruner, say); others go on
            outcome[member.index] = e
            continue
        left.append(member)
    return left


def _print_progress(
    label: str,
    epoch: int,
    epochs: int,
    members: list[_Member],
    left: list[_Member],
    depth: int,
    took: float,
) -> None:
    prefix = f"{label} " if label else ""
    vals = [m.val[-1] for m in members if m.val and len(m.val) == epoch]
    best = f", best val accuracy {max(vals):.4f}" if vals else ""
    full = members[0].config.depth
    stack = f" (stack of {depth}/{full} blocks)" if left and depth < full else ""
    print(
        f"{prefix}epoch {epoch}/{epochs}: {len(members)} trials together, {len(left)} go on"
        f"{stack}{best}, {took:.2f}s",
        file=sys.stderr,
        flush=True,
    )
