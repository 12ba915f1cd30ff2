"""What a run records epoch by epoch: one :class:`History`, whatever reads or writes it.

Three formats outside the engine name its lists, and keep the names they had before the
lists were one type: a saved state (``"state"``, see :mod:`tauopt.engine._state`), a study's
trial attributes and their exports (``"stored"``), and ``tauopt train --json`` (``"json"``).
Each field says its name in each of them where it differs from its own; a field one of them
leaves out says None there. Adding a metric is adding a field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

#: The formats a history is written in, besides its own field names.
Format = Literal["state", "stored", "json"]


@dataclass(frozen=True)
class PruneEvent:
    """Block ``block`` (original numbering) was removed after ``epoch`` from ``position``."""

    epoch: int
    position: int
    block: int


def _names(*, item: type | None = None, **names: str | None) -> dict[str, Any]:
    """A per-epoch list's metadata: ``names`` are its names in other formats, ``item`` the
    dataclass each entry is (written as a dict)."""
    return {"names": names, "item": item}


@dataclass
class History:
    """One run's records, one entry per epoch (``resumed_from``: one per time it went on).

    ``val_accuracy`` is empty without validation images; ``train_accuracy`` is measured on a
    fixed subset of the training split (:data:`tauopt.engine._data.TRAIN_EVAL_SIZE`);
    ``train_loss`` is the loss trained on (mean over the epoch's batches) and ``clean_loss``
    its cross-entropy alone; ``penalties`` the l1 and horizon terms at the epoch's end;
    ``test_accuracy`` is filled only by a run that tests every epoch. ``taus`` holds every
    original block's tau (a pruned block's is exactly zero). ``epoch_seconds`` is the whole
    epoch (evaluation included), ``train_seconds`` its training pass. ``resumed_from``: where
    the run went on from a saved state, ``{"epoch": e, "batch": b}`` (after ``e`` epochs and
    ``b`` batches of the next one), in order; empty for a run trained in one go.
    """

    val_accuracy: list[float] = field(
        default_factory=list, metadata=_names(state="val", stored="val_accuracy_history")
    )
    test_accuracy: list[float] = field(
        default_factory=list,
        metadata=_names(state="test", stored="test_accuracy_history", json="test_accuracy_history"),
    )
    train_accuracy: list[float] = field(
        default_factory=list, metadata=_names(state="train_acc", stored="train_accuracy_history")
    )
    train_loss: list[float] = field(
        default_factory=list, metadata=_names(state="losses", stored="train_loss_history")
    )
    clean_loss: list[float] = field(
        default_factory=list, metadata=_names(state="clean", stored="clean_loss_history")
    )
    penalties: list[dict[str, float]] = field(
        default_factory=list, metadata=_names(stored="penalty_history")
    )
    taus: list[list[float]] = field(
        default_factory=list,
        metadata=_names(state="history", stored="tau_history", json="tau_history"),
    )
    pruned: list[PruneEvent] = field(
        default_factory=list, metadata=_names(item=PruneEvent, stored="pruned_layers")
    )
    epoch_seconds: list[float] = field(default_factory=list, metadata=_names(state="seconds"))
    train_seconds: list[float] = field(default_factory=list, metadata=_names(stored=None))
    resumed_from: list[dict[str, int]] = field(
        default_factory=list, metadata=_names(state="resumed")
    )

    @staticmethod
    def name_in(f: dataclasses.Field[Any], kind: Format) -> str | None:
        """The name of the field ``f`` in the format ``kind`` (None: not written there)."""
        names: Mapping[str, str | None] = f.metadata["names"]
        return names.get(kind, f.name)

    def to_names(self, kind: Format) -> dict[str, list[Any]]:
        """Copies of the lists as plain data, under their names in ``kind``."""
        out: dict[str, list[Any]] = {}
        for f in dataclasses.fields(self):
            name = self.name_in(f, kind)
            if name is not None:
                values = getattr(self, f.name)
                plain = f.metadata["item"] is not None
                out[name] = [dataclasses.asdict(v) for v in values] if plain else list(values)
        return out

    @classmethod
    def from_names(cls, data: Mapping[str, Any], kind: Format, *, strict: bool) -> History:
        """The history written by :meth:`to_names`. ``strict``: a list it lacks is a
        ``KeyError`` (a saved state holds every one); otherwise it is empty (a trial stored
        before that metric was)."""
        lists: dict[str, list[Any]] = {}
        for f in dataclasses.fields(cls):
            name = cls.name_in(f, kind)
            if name is None or (not strict and name not in data):
                continue
            item = f.metadata["item"]
            values = list(data[name])
            lists[f.name] = values if item is None else [item(**v) for v in values]
        return cls(**lists)

    def copy(self) -> History:
        """A copy whose lists later epochs do not change."""
        return dataclasses.replace(
            self, **{f.name: list(getattr(self, f.name)) for f in dataclasses.fields(self)}
        )

    def blocks_before_pruning(self) -> list[int]:
        """Active blocks during each epoch (pruning runs after the epoch is recorded)."""
        return [sum(1 for tau in taus if tau != 0.0) for taus in self.taus]
