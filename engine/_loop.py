"""The epoch loop, written once for a lone network and for a population of them.

A run trains epoch by epoch; after each epoch every member is checked, evaluated, recorded,
pruned and reported, in that order, whatever steps it: :class:`Stepper` is what differs between
one network's fused step (``engine._train``) and the batched step of a population
(``engine._population``). A member whose loss or taus stop being finite, or whose caller stops
it from ``on_epoch``, leaves the run; the others go on.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from tqdm import tqdm

from tauopt.engine._config import TrainConfig
from tauopt.engine._data import Splits
from tauopt.engine._history import History, PruneEvent
from tauopt.engine._state import (
    Checkpointing,
    RunPausedError,
    RunState,
    estimate_seconds,
)
from tauopt.errors import DivergedError, TauoptError
from tauopt.models import TauNetwork

_EVAL_CHUNK = 10_000


@dataclass(frozen=True)
class EpochStats:
    """What a caller sees after each epoch (for example to report to an Optuna trial).
    ``val_accuracy`` is NaN for a run without validation images."""

    epoch: int
    val_accuracy: float
    train_loss: float
    active_blocks: int
    active_params: int
    train_accuracy: float = math.nan
    clean_loss: float = math.nan


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """One finished run: its per-epoch ``history``, where it ended, and the trained (possibly
    pruned) network."""

    config: TrainConfig
    device: str
    test_accuracy: float
    #: The active blocks' taus at the end.
    taus: list[float]
    active_blocks: int
    active_block_ids: list[int]
    active_params: int
    #: Parameters of the network before any pruning.
    initial_params: int = 0
    history: History = field(default_factory=History)
    model: TauNetwork = field(repr=False, compare=False)

    @property
    def final_val_accuracy(self) -> float:
        """The last epoch's validation accuracy (NaN without validation images)."""
        values = self.history.val_accuracy
        return values[-1] if values else math.nan

    @property
    def tau_sum(self) -> float:
        return sum(self.taus)


def result_data(result: TrainResult) -> dict[str, Any]:
    """A result as JSON-ready data, the network left out: its fields, ``tau_sum``, and its
    history's lists under their ``"json"`` names (see :class:`History`)."""
    data: dict[str, Any] = {}
    for f in dataclasses.fields(result):
        value = getattr(result, f.name)
        if f.name == "model":
            continue
        if isinstance(value, History):
            data.update(value.to_names("json"))
        elif isinstance(value, TrainConfig):
            data[f.name] = value.to_dict()
        else:
            data[f.name] = value
    return {**data, "tau_sum": result.tau_sum}


@dataclass
class RunRecord:
    """What one run records epoch by epoch as it trains, and its :class:`TrainResult` once
    trained."""

    config: TrainConfig
    #: Parameters of the network before any pruning.
    initial_params: int
    history: History = field(default_factory=History)

    @classmethod
    def from_state(cls, state: RunState) -> RunRecord:
        """The records of the run ``state`` is a point of, noting that it goes on from there."""
        history = state.record.copy()
        history.resumed_from.append({"epoch": state.epoch, "batch": state.batch})
        return cls(state.config, state.initial_params, history)

    def record_taus(self, block_ids: Sequence[int], taus: Sequence[float]) -> None:
        """The taus of the blocks ``block_ids``, over every original block (a pruned block's
        tau is exactly zero), and the penalty terms they give."""
        full = [0.0] * self.config.depth
        for block, tau in zip(block_ids, taus, strict=True):
            full[block] = tau
        self.history.taus.append(full)
        c = self.config
        self.history.penalties.append(
            {
                "l1": c.l1 * sum(abs(t) for t in taus),
                "horizon": c.horizon_weight * (sum(taus) - c.T) ** 2,
            }
        )

    def stats(self, epoch: int, network: TauNetwork) -> EpochStats:
        h = self.history
        return EpochStats(
            epoch,
            h.val_accuracy[-1] if h.val_accuracy else math.nan,
            h.train_loss[-1],
            network.depth,
            network.num_active_params(),
            h.train_accuracy[-1],
            h.clean_loss[-1],
        )

    def result(self, model: TauNetwork, splits: Splits, device: torch.device) -> TrainResult:
        """The finished run of ``model``: the records, the test accuracy, the final taus."""
        return TrainResult(
            config=self.config,
            device=str(device),
            test_accuracy=accuracy(model, splits.test_x, splits.test_y),
            taus=model.taus.detach().cpu().tolist(),
            active_blocks=model.depth,
            active_block_ids=list(model.block_ids),
            active_params=model.num_active_params(),
            initial_params=self.initial_params,
            history=self.history,
            model=model,
        )


@torch.inference_mode()
def accuracy(model: TauNetwork, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of ``x`` that ``model`` classifies as ``y`` (NaN for no images)."""
    if x.shape[0] == 0:
        return math.nan
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    for start in range(0, x.shape[0], _EVAL_CHUNK):
        logits = model(x[start : start + _EVAL_CHUNK])
        correct += (logits.argmax(1) == y[start : start + _EVAL_CHUNK]).sum()
    return float(correct) / x.shape[0]


class RunStoppedError(TauoptError):
    """The caller's ``on_epoch`` stopped the run after ``epoch`` (a study's pruner, say) by
    raising ``cause``; ``result`` is the run as far as it got (its records up to that epoch,
    the test accuracy of the network it had then)."""

    epoch: int
    cause: Exception
    result: TrainResult

    def __init__(self, epoch: int, cause: Exception, result: TrainResult) -> None:
        super().__init__(f"stopped by its caller after epoch {epoch}: {cause}")
        self.epoch = epoch
        self.cause = cause
        self.result = result


def check_finite(epoch: int, loss: float, taus: list[float]) -> None:
    if not math.isfinite(loss):
        raise DivergedError(epoch, f"training loss is {loss}; lower the learning rate or T")
    if not all(math.isfinite(t) for t in taus):
        raise DivergedError(epoch, f"step sizes became non-finite: {taus}")


@dataclass(frozen=True)
class EpochPass:
    """What one pass of :meth:`Stepper.train_epoch` did: ``batches`` of the epoch are done
    (those it was told to skip included). A complete pass gives every member's mean loss and
    mean clean loss; a pass paused before the epoch's end gives their sums so far instead."""

    batches: int
    losses: list[float] = field(default_factory=list)
    clean: list[float] = field(default_factory=list)
    sums: list[tuple[float, float]] | None = None

    @property
    def complete(self) -> bool:
        return self.sums is None


class Stepper(Protocol):
    """Trains the members of a run (positions ``0 .. size-1``) one epoch at a time."""

    @property
    def depth(self) -> int:
        """Blocks the step computes now (a population's stack; one network's blocks)."""

    def train_epoch(
        self,
        order: torch.Tensor,
        bar: tqdm[Any],
        *,
        start: int = 0,
        sums: Sequence[tuple[float, float]] | None = None,
        pause: Callable[[int], bool] = lambda done: False,
    ) -> EpochPass:
        """One pass over the training split, batches in ``order`` (a permutation of its
        images): the first ``start`` batches are skipped (a pass that goes on, with the losses
        summed so far ``sums``); after each batch but the last, ``pause(batches done)`` may end
        the pass there."""

    def taus(self, position: int) -> list[float]:
        """The member's active taus."""

    def block_ids(self, position: int) -> list[int]:
        """The original numbers of the member's active blocks."""

    def network(self, position: int) -> TauNetwork:
        """The member as a network, up to date."""

    def state(self, position: int) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        """The member's network as a :class:`RunState` holds it, and its slots in a
        population's stack (None for a network stepped alone)."""

    def prune(self, position: int, eps: float, rule: str) -> list[int]:
        """Remove the member's blocks that ``rule`` picks; their positions in its taus."""

    def keep(self, positions: list[int]) -> None:
        """Only the members at ``positions`` go on, renumbered in that order."""


@dataclass(frozen=True, kw_only=True)
class LoopOptions:
    """How :func:`run_epochs` reports: ``on_epoch(index, stats)`` after every epoch (it may
    raise to stop that member), progress lines (and a bar on a terminal) to stderr; and where
    its states go (``checkpoints``: saved at epoch boundaries and when a stop is asked)."""

    on_epoch: Callable[[int, EpochStats], None] | None = None
    progress: bool = False
    label: str = ""
    test_every_epoch: bool = False
    checkpoints: Checkpointing | None = None


def loop_start(states: Sequence[RunState]) -> RunState | None:
    """The point a run of these members goes on from (None: from the start). They must all
    stand at one point, with one batch order."""
    if not states:
        return None
    first = states[0]
    for state in states[1:]:
        if state.point != first.point or not torch.equal(state.order, first.order):
            raise ValueError(
                f"members that train together must go on from one point: {first.point} and "
                f"{state.point}"
            )
    return first


class _Run:
    """One call of :func:`run_epochs`: its members, where they stand, and their states."""

    def __init__(
        self,
        stepper: Stepper,
        records: Sequence[RunRecord],
        options: LoopOptions,
        start: RunState | None,
    ) -> None:
        self.stepper, self.records, self.options = stepper, records, options
        self.checkpoints = options.checkpoints
        self.live = list(range(len(records)))  # record index of each stepper position
        self.generator = torch.Generator().manual_seed(records[0].config.order_seed)
        #: where each member's latest saved state stands
        self.saved: dict[int, tuple[int, int]] = {}
        self.group = uuid.uuid4().hex
        self.since_save = 0.0  # seconds trained since the last save
        self.after = 0.0  # seconds an epoch's end (evaluation, pruning, reports) took last
        if start is not None:
            self.generator.set_state(start.order)
            self.saved = dict.fromkeys(self.live, start.point)

    def stop_in(self) -> float | None:
        return None if self.checkpoints is None else self.checkpoints.stop_in()

    def saving(self) -> bool:
        return self.checkpoints is not None and self.checkpoints.every > 0

    def due(self, stop: float | None) -> bool:
        """Whether to save at this epoch boundary: a stop was asked, or ``every`` seconds of
        training passed since the last save."""
        every = 0.0 if self.checkpoints is None else self.checkpoints.every
        return every > 0 and (stop is not None or self.since_save >= every)

    def pauser(self, start: int, total: int, began: float) -> Callable[[int], bool]:
        """``pause(done)`` for one pass: once a stop is asked, whether to stop after this
        batch (True) or go on to the epoch's end, which is then within the time left."""
        decided: list[bool] = []

        def pause(done: int) -> bool:
            if not decided:
                left = self.stop_in()
                if left is None:
                    return False
                ahead = estimate_seconds(
                    done - start, total - start, time.perf_counter() - began, self.after
                )
                decided.append(not self.saving() or ahead > left)
            return decided[0]

        return pause

    def save(
        self,
        epoch: int,
        batch: int,
        order: torch.Tensor,
        sums: Sequence[tuple[float, float]] | None,
        seconds: float,
    ) -> None:
        """Hand every live member's state to the caller."""
        if self.checkpoints is None or not self.live:
            return
        states = {}
        for position, index in enumerate(self.live):
            network, slots = self.stepper.state(position)
            record = self.records[index]
            states[index] = RunState(
                config=record.config,
                epoch=epoch,
                batch=batch,
                order=order.clone(),
                network=network,
                record=record.history.copy(),
                initial_params=record.initial_params,
                slots=slots,
                group=None if slots is None else self.group,
                sums=None if sums is None else sums[position],
                epoch_seconds=seconds,
            )
        self.checkpoints.save(states)
        self.saved.update(dict.fromkeys(self.live, (epoch, batch)))
        self.since_save = 0.0

    def paused(self) -> dict[int, Exception]:
        return {index: RunPausedError(self.saved.get(index)) for index in self.live}


def run_epochs(
    stepper: Stepper,
    records: Sequence[RunRecord],
    splits: Splits,
    device: torch.device,
    options: LoopOptions,
    states: Sequence[RunState] | None = None,
) -> list[TrainResult | Exception]:
    """Train every member for its config's epochs; per member, its result or what ended it.

    ``states``, one per member, are where the members go on from (one point: see
    :func:`loop_start`; the caller restores the stepper and the records from them). With
    ``options.checkpoints``, every live member's state is saved at the first epoch boundary
    after ``every`` seconds of training; once a stop is asked, at the end of the current batch,
    or at the epoch's end if that comes within the time left, and the members still training
    end with :class:`RunPausedError`.

    Each member's ``seconds`` is the epoch's time shared out over the members trained in it.
    """
    first = records[0].config
    start = loop_start(states or [])
    run = _Run(stepper, records, options, start)
    outcome: dict[int, TrainResult | Exception] = {}
    if run.stop_in() is not None:  # asked before anything was trained
        return [run.paused()[i] for i in range(len(records))]
    n_batches = math.ceil(splits.train_x.shape[0] / first.batch_size)
    prefix = f"{options.label} " if options.label else ""
    begin, batch = (0, 0) if start is None else start.point
    sums = None
    if states and start is not None and start.sums is not None:
        sums = [s.sums or (0.0, 0.0) for s in states]
    carried = 0.0 if start is None else start.epoch_seconds
    for epoch in range(begin + 1, first.epochs + 1):
        order_state = run.generator.get_state()
        order = torch.randperm(splits.train_x.shape[0], generator=run.generator)
        began = time.perf_counter()
        with tqdm(
            total=n_batches,
            initial=batch,
            desc=f"{prefix}epoch {epoch}/{first.epochs}",
            # Not on a log file: a bar redrawn with carriage returns is noise there.
            disable=not (options.progress and sys.stderr.isatty()),
            file=sys.stderr,
            leave=False,
        ) as bar:
            done = stepper.train_epoch(
                order,
                bar,
                start=batch,
                sums=sums,
                pause=run.pauser(batch, n_batches, began),
            )
        trained = len(run.live)
        train_seconds = (time.perf_counter() - began) / trained + carried
        if not done.complete:
            if run.saving():
                run.save(epoch - 1, done.batches, order_state, done.sums, train_seconds)
            outcome.update(run.paused())
            return [outcome[i] for i in range(len(records))]
        batch, sums, carried = 0, None, 0.0
        ended = time.perf_counter()
        going = []
        for position, index in enumerate(run.live):
            record = records[index]
            try:
                _end_epoch(stepper, position, record, epoch, done, splits, options)
            except DivergedError as e:
                outcome[index] = e
                continue
            going.append(position)
        seconds = train_seconds + (time.perf_counter() - ended) / trained
        stays = []
        for position in going:
            record = records[run.live[position]]
            record.history.train_seconds.append(train_seconds)
            record.history.epoch_seconds.append(seconds)
            try:
                if options.on_epoch is not None:
                    options.on_epoch(
                        run.live[position], record.stats(epoch, stepper.network(position))
                    )
            except Exception as e:  # the caller stops this member (a pruner, say)
                network = stepper.network(position)
                stopped = RunStoppedError(epoch, e, record.result(network, splits, device))
                stopped.__cause__ = e
                outcome[run.live[position]] = stopped
                continue
            stays.append(position)
        stepper.keep(stays)
        if options.progress:
            _print_progress(
                prefix, epoch, records, run.live, going, stays, stepper, seconds * trained
            )
        run.live = [run.live[p] for p in stays]
        run.after = time.perf_counter() - ended
        run.since_save += time.perf_counter() - began
        if not run.live:
            break
        if epoch == first.epochs:
            break
        stop = run.stop_in()
        if run.due(stop):
            run.save(epoch, 0, run.generator.get_state(), None, 0.0)
        if stop is not None:
            outcome.update(run.paused())
            return [outcome[i] for i in range(len(records))]
    for position, index in enumerate(run.live):
        outcome[index] = records[index].result(stepper.network(position), splits, device)
    return [outcome[i] for i in range(len(records))]


def _end_epoch(
    stepper: Stepper,
    position: int,
    record: RunRecord,
    epoch: int,
    done: EpochPass,
    splits: Splits,
    options: LoopOptions,
) -> None:
    """Check, evaluate, record and prune one member after an epoch."""
    taus = stepper.taus(position)
    check_finite(epoch, done.losses[position], taus)
    network = stepper.network(position)
    h = record.history
    if splits.val_x.shape[0]:
        h.val_accuracy.append(accuracy(network, splits.val_x, splits.val_y))
    h.train_accuracy.append(accuracy(network, splits.train_eval_x, splits.train_eval_y))
    if options.test_every_epoch:
        h.test_accuracy.append(accuracy(network, splits.test_x, splits.test_y))
    ids = stepper.block_ids(position)
    record.record_taus(ids, taus)
    h.train_loss.append(done.losses[position])
    h.clean_loss.append(done.clean[position])
    c = record.config
    if c.prune_eps is not None and c.arch == "resnet" and epoch % c.prune_every == 0:
        for removed in stepper.prune(position, c.prune_eps, c.prune_rule):
            h.pruned.append(PruneEvent(epoch, removed, ids[removed]))


def _print_progress(
    prefix: str,
    epoch: int,
    records: Sequence[RunRecord],
    live: list[int],
    going: list[int],
    stays: list[int],
    stepper: Stepper,
    took: float,
) -> None:
    """A line per epoch: a lone run's loss and accuracy, or a population's head count."""
    epochs, full = records[0].config.epochs, records[0].config.depth
    if len(records) == 1:
        line = "diverged"
        if going:
            h = records[0].history
            acc = (
                f"val accuracy {h.val_accuracy[-1]:.4f}"
                if h.val_accuracy
                else (f"train accuracy {h.train_accuracy[-1]:.4f}")
            )
            line = f"loss {h.train_loss[-1]:.4f}, {acc}, {stepper.depth} blocks"
        print(f"{prefix}epoch {epoch}/{epochs}: {line}, {took:.2f}s", file=sys.stderr, flush=True)
        return
    histories = [records[live[p]].history for p in going]
    vals = [h.val_accuracy[-1] for h in histories if h.val_accuracy]
    best = f", best val accuracy {max(vals):.4f}" if vals else ""
    depth = stepper.depth
    stack = f" (stack of {depth}/{full} blocks)" if stays and depth < full else ""
    print(
        f"{prefix}epoch {epoch}/{epochs}: {len(live)} trials together, {len(stays)} go on"
        f"{stack}{best}, {took:.2f}s",
        file=sys.stderr,
        flush=True,
    )
