"""Where a run of ``tauopt reproduce`` sits in its grid: :class:`GridPoint`, its coordinates as
a trial stores them (``tauopt.study._reproduce`` makes them)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GridPoint:
    """Where a run of ``tauopt reproduce`` sits in its grid: its coordinates (the factors
    that tell it from the other runs, see ``tauopt.study._reproduce``), in the order they
    were stored. The report pairs runs by them, by name (:meth:`get`); the ones every grid
    has are typed properties."""

    coords: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, coords: Mapping[str, Any]) -> GridPoint:
        return cls(tuple(coords.items()))

    def __bool__(self) -> bool:
        return bool(self.coords)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.coords)

    def get(self, name: str, default: Any = None) -> Any:
        return self.as_dict().get(name, default)

    @property
    def key(self) -> str:
        """The coordinates as one comparable string."""
        return json.dumps(self.as_dict(), sort_keys=True)

    @property
    def protocol(self) -> str:
        return str(self.get("protocol"))

    @property
    def arch(self) -> str:
        return str(self.get("arch"))

    @property
    def dataset(self) -> str:
        return str(self.get("dataset"))

    @property
    def seed(self) -> int:
        return int(self.get("seed", 0))

    @property
    def T(self) -> float:  # the papers' name of the horizon
        return float(self.get("T", 1.0))

    @property
    def taus(self) -> str:
        """Which taus train: ``trainable``, ``fixed`` or ``input-fixed``."""
        return str(self.get("taus"))

    @property
    def l1(self) -> float:
        return float(self.get("l1") or 0.0)

    @property
    def horizon_weight(self) -> float:
        return float(self.get("horizon_weight") or 0.0)

    @property
    def last_tau(self) -> str:
        return str(self.get("last_tau"))

    @property
    def pruning(self) -> str:
        """``off``, or the pruning rule."""
        return str(self.get("pruning", "off"))

    @property
    def prunes(self) -> bool:
        return self.pruning != "off"

    @property
    def memory(self) -> str | None:
        """A Fractional DNN's memory gradient, ``full`` or ``detached`` (None: a ResNet)."""
        value = self.get("memory")
        return None if value is None else str(value)

    @property
    def lr(self) -> float | None:
        """The learning rate where the grid varies it (``lr-matched``), else None."""
        value = self.get("lr")
        return None if value is None else float(value)


#: The point of a run outside any grid (a searched trial): it has no coordinates.
NO_POINT = GridPoint(())
