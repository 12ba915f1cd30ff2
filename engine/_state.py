"""A run's state in the middle of its training, to go on from there with the same result.

:func:`tauopt.engine._loop.run_epochs` hands a :class:`RunState` per member to its caller's
:class:`Checkpointing` (at epoch boundaries, every ``every`` seconds of training, and when a
stop is asked), and takes them back to resume. A state holds everything the rest of the run
depends on: the network (weights, taus, the blocks pruning left), the optimiser's state (plain
SGD keeps none), the batch order's generator, where in the epoch it stopped with the loss
summed so far, and every per-epoch record. The engine does no I/O here; a study writes states
to files (``tauopt.study._resume``).

A population's member carries two forms of its network: the network itself (any stepper can
go on from it: alone, or in another population) and its slots in the stack it trained in (a
population of the same members goes on from those, with the very same arithmetic).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tauopt.engine._config import TrainConfig
from tauopt.engine._history import History
from tauopt.models import TauNetwork

#: What the optimiser keeps between steps: plain SGD (``engine._train.PlainSGD`` and the
#: population's fused update) keeps nothing but its parameters, which the network holds.
OPTIMIZER_STATE: dict[str, str] = {"kind": "plain-sgd"}


@dataclass(frozen=True, kw_only=True)
class RunState:
    """One run after ``epoch`` epochs and ``batch`` batches of the next one (0 at an epoch
    boundary).

    ``order`` is the batch order generator's state at the start of epoch ``epoch + 1``: its
    permutation is drawn again and the first ``batch`` batches are skipped. ``sums`` holds the
    losses summed over those batches (the training loss and its cross-entropy alone), and
    ``epoch_seconds`` the training time they took. ``network`` is the member's network as
    ``{"block_ids": [...], "state_dict": {...}}`` (CPU tensors); ``slots`` its part of a
    population's stack (``tauopt.models.TauPopulation.member_slots``), None for a network
    that trained alone. ``record`` is the run's history so far (written under its names in a
    state, :meth:`History.to_names` ``("state")``).
    """

    config: TrainConfig
    epoch: int
    batch: int
    order: torch.Tensor
    network: Mapping[str, Any]
    record: History
    initial_params: int
    slots: Mapping[str, torch.Tensor] | None = None
    #: The population the slots come from (one token per training of a group): members of one
    #: group that go on together go on from their slots, as one population again.
    group: str | None = None
    sums: tuple[float, float] | None = None
    epoch_seconds: float = 0.0
    optimizer: Mapping[str, str] = field(default_factory=lambda: dict(OPTIMIZER_STATE))

    def __post_init__(self) -> None:
        if not 0 <= self.epoch < self.config.epochs:
            raise ValueError(
                f"a state after epoch {self.epoch} of a {self.config.epochs}-epoch run"
            )
        if self.batch < 0 or (self.batch > 0) != (self.sums is not None):
            raise ValueError(f"batch {self.batch} and loss sums {self.sums} do not agree")
        if dict(self.optimizer) != OPTIMIZER_STATE:
            raise ValueError(f"an optimiser state this engine does not train: {self.optimizer}")
        lengths = {"losses": len(self.record.train_loss), "history": len(self.record.taus)}
        if set(lengths.values()) != {self.epoch}:
            raise ValueError(f"records of {lengths} epochs in a state after epoch {self.epoch}")

    @property
    def point(self) -> tuple[int, int]:
        """Where the run stands: (epochs done, batches of the next one done)."""
        return (self.epoch, self.batch)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tensors, lists, numbers, strings): what ``torch.load(weights_only=True)``
        reads back."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["config"] = self.config.to_dict()
        data["network"] = dict(self.network)
        data["record"] = self.record.to_names("state")
        data["slots"] = None if self.slots is None else dict(self.slots)
        data["sums"] = None if self.sums is None else list(self.sums)
        data["optimizer"] = dict(self.optimizer)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunState:
        """The state of :meth:`to_dict`; ``ValueError``, ``TypeError`` or ``KeyError`` for
        data that is not one."""
        sums = data["sums"]
        order = data["order"]
        if not isinstance(order, torch.Tensor) or order.dtype != torch.uint8:
            raise TypeError("the batch order's generator state is not a byte tensor")
        return cls(
            config=TrainConfig(**data["config"]),
            epoch=int(data["epoch"]),
            batch=int(data["batch"]),
            order=order,
            network=dict(data["network"]),
            record=History.from_names(data["record"], "state", strict=True),
            initial_params=int(data["initial_params"]),
            slots=None if data["slots"] is None else dict(data["slots"]),
            group=None if data["group"] is None else str(data["group"]),
            sums=None if sums is None else (float(sums[0]), float(sums[1])),
            epoch_seconds=float(data["epoch_seconds"]),
            optimizer=dict(data["optimizer"]),
        )


def network_state(network: torch.nn.Module, block_ids: Sequence[int]) -> dict[str, Any]:
    """A network as a state holds it: its blocks' original numbers and its weights (CPU)."""
    weights = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
    return {"block_ids": list(block_ids), "state_dict": weights}


def restore_network(model: TauNetwork, state: Mapping[str, Any]) -> TauNetwork:
    """Load a network state (:func:`network_state`) into ``model``, a network of its config
    built unpruned, pruning it to the state's blocks; returns it."""
    ids = list(state["block_ids"])
    if ids != list(range(model.depth)):
        model.keep_blocks(ids)  # the full model's positions are the original ids
    model.load_state_dict(state["state_dict"])
    return model


class Checkpointing(Protocol):
    """What a run's caller does with its states, and when it wants it to stop.

    ``every``: seconds of training between two saves (at the first epoch boundary after
    them); 0 saves nothing, not even when a stop is asked.
    """

    @property
    def every(self) -> float: ...

    def stop_in(self) -> float | None:
        """Seconds left before a stop that was asked must be done, or None (no stop asked)."""

    def save(self, states: Mapping[int, RunState]) -> None:
        """Keep ``states`` (by member index); a failure to keep them is the caller's to report,
        never the run's end."""


class RunPausedError(Exception):
    """The run stopped before its end because its caller asked (see
    :meth:`Checkpointing.stop_in`); ``saved`` is where its latest saved state stands (epochs,
    batches), None where none was saved."""

    def __init__(self, saved: tuple[int, int] | None) -> None:
        where = (
            "nothing saved"
            if saved is None
            else f"state after epoch {saved[0]}"
            + (f", batch {saved[1]} of the next" if saved[1] else "")
        )
        super().__init__(f"stopped before its end ({where})")
        self.saved = saved


def estimate_seconds(done: int, total: int, elapsed: float, after: float) -> float:
    """Seconds to the end of an epoch whose ``done`` of ``total`` batches took ``elapsed``,
    and whose work after the batches took ``after`` the last time."""
    if done <= 0:
        return math.inf
    return (total - done) * elapsed / done + after
