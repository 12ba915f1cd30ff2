"""Population training: several runs of one shape trained together, in lockstep.

The members of a group share the architecture, the data and its order (``group_key``); each
keeps its own initialisation, learning rate, penalties, horizon, fractional order and pruning
threshold. Every member's result equals what :func:`train` gives for its config alone, to
float tolerance (the batched products sum in another order): same batches, same updates, the
same pruning decisions, and the evaluation runs on the member's own network.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from tauopt.engine._config import TrainConfig
from tauopt.engine._data import RawDataset, make_splits
from tauopt.engine._loop import (
    EpochStats,
    LoopOptions,
    RunRecord,
    TrainResult,
    loop_start,
    run_epochs,
)
from tauopt.engine._population_step import PopulationStepper
from tauopt.engine._state import Checkpointing, RunPausedError, RunState
from tauopt.engine._train import (
    build_model,
    check_fits,
    check_resumes,
    parameter_count,
    resolve_device,
    train,
)
from tauopt.errors import ConfigError

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
    "detach_memory",
    "prune_every",
    "normalize",
    "precision",
)


def group_key(config: TrainConfig) -> tuple[object, ...]:
    """Configs with equal keys can train as one population."""
    return (*(getattr(config, name) for name in _SHARED), config.order_seed, config.split_order)


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
    states: Sequence[RunState | None] | None = None,
    checkpoints: Checkpointing | None = None,
) -> list[TrainResult | Exception]:
    """Train every config of ``configs`` (all with one :func:`group_key`) as one population
    (ResNets and fractional networks together, or apart where both sides are large enough and
    the ResNets may prune: see :func:`_parts`) where there are at least :data:`MIN_BATCH` of
    them, else each alone with :func:`train`.

    Returns, per config in order, its :class:`TrainResult`, or the exception that ended it:
    :class:`DivergedError` when its loss or a step size stopped being finite, or a
    :class:`~tauopt.engine._loop.RunStoppedError` (with what it trained so far) where
    ``on_epoch(index, stats)`` raised for it (a study's pruner stops a member that way). Such a
    member leaves the group and the others go on. A ``BaseException`` that is not an
    ``Exception`` (a stop signal) ends the whole call.

    An epoch's time is shared out: each member's ``epoch_seconds`` is the group's epoch time
    divided by the members trained in it.

    ``states`` (None or one per config, None for a member that starts from scratch) are where
    the members go on from; they must all stand at one point (epochs and batches done; a
    member without a state stands at the start). Members whose states come from one training
    of one group train together again, whatever their number, from their slots in its stack:
    the same arithmetic as if they had never stopped. ``checkpoints`` takes their states as
    they train (see :func:`tauopt.engine._loop.run_epochs`); once it asks for a stop, the
    members not finished end with :class:`RunPausedError`.
    """
    if not configs:
        return []
    configs = [c.for_training_split(len(dataset.train)) for c in configs]
    keys = {group_key(c) for c in configs}
    if len(keys) > 1:
        raise ConfigError("a population's configs must agree on " + ", ".join(_SHARED))
    if dataset.name != configs[0].dataset:
        raise ConfigError(f"config asks for {configs[0].dataset!r} but {dataset.name!r} was loaded")
    given = list(states) if states is not None else [None] * len(configs)
    if len(given) != len(configs):
        raise ValueError(f"{len(given)} states for {len(configs)} configs")
    resumed = [s for s in given if s is not None]
    if resumed and len(resumed) < len(configs):
        raise ValueError("members that train together go on from one point: all or none")
    loop_start(resumed)
    outcome: dict[int, TrainResult | Exception] = {}
    parts, together = _parts(configs), False
    groups = {s.group for s in resumed}
    if resumed and None not in groups and len(groups) == 1:
        parts, together = [list(range(len(configs)))], True  # one group's training goes on
    for part in parts:
        if checkpoints is not None and checkpoints.stop_in() is not None:
            outcome.update({i: _paused(given[i]) for i in part})
            continue
        relay = None if on_epoch is None else partial(_relay, on_epoch, part)
        saves = None if checkpoints is None else _Renumbered(checkpoints, part)
        part_states = [s for s in (given[i] for i in part) if s is not None] or None
        if together or len(part) >= MIN_BATCH:
            arch = configs[part[0]].arch
            options = LoopOptions(
                on_epoch=relay,
                progress=progress,
                label=f"{label} ({arch} members)".strip() if len(parts) > 1 else label,
                test_every_epoch=test_every_epoch,
                checkpoints=saves,
            )
            results = _train_together(
                [configs[i] for i in part],
                dataset,
                dev=resolve_device(device),
                options=options,
                states=part_states,
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
                    resume=given[index],
                    checkpoints=None if checkpoints is None else _Renumbered(checkpoints, [index]),
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


def _paused(state: RunState | None) -> RunPausedError:
    return RunPausedError(None if state is None else state.point)


@dataclass(frozen=True)
class _Renumbered:
    """A part's checkpoints: its members' states under their indices in the whole call."""

    checkpoints: Checkpointing
    part: list[int]

    @property
    def every(self) -> float:
        return self.checkpoints.every

    def stop_in(self) -> float | None:
        return self.checkpoints.stop_in()

    def save(self, states: Mapping[int, RunState]) -> None:
        self.checkpoints.save({self.part[i]: state for i, state in states.items()})


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
    options: LoopOptions,
    states: Sequence[RunState] | None = None,
) -> list[TrainResult | Exception]:
    first = configs[0]
    for config in configs:  # K members hold K batches' states at once
        batch = config.batch_size * len(configs)
        check_fits(config.replace(batch_size=batch), dataset.in_features, dataset.num_classes, dev)
    splits = make_splits(
        dataset,
        val_size=first.held_out,
        train_size=first.train_size,
        device=dev,
        normalize=first.normalize,
        seed=first.split_order,
    )
    shape = (dataset.in_features, dataset.num_classes)
    records = [RunRecord(c, parameter_count(c, *shape)) for c in configs]
    if states is not None:
        for config, state in zip(configs, states, strict=True):
            check_resumes(config, state)
        records = [RunRecord.from_state(state) for state in states]
    networks = [build_model(c, *shape).to(dev) for c in configs]
    if splits.mean is not None and splits.std is not None:
        for network in networks:
            network.standardize_inputs(splits.mean, splits.std)
    stepper = PopulationStepper(configs, networks, splits, states=states)
    return run_epochs(stepper, records, splits, dev, options, states)
