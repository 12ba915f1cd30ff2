"""Stopping poor trials early: Optuna's median rule for a single objective, and for the
Pareto study (where Optuna's pruners do not apply: ``Trial.report`` is single-objective) a
rule of dominance at epoch milestones.

``dominated``: at the rungs, epochs 1, 2, 4, 8, ... short of the last, a trial records its
validation accuracy so far and its active parameters; it stops when at least
:data:`MIN_DOMINATORS` trials already at that rung dominate it (as accurate or more with as
few parameters or fewer, better in one) among at least :data:`MIN_AT_RUNG` there. A stopped
trial is PRUNED: it keeps its record, and is never on the front.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import optuna

from tauopt.engine import EpochStats
from tauopt.study._ledger import Ledger
from tauopt.study._record import rung_attr, rungs_of

MIN_DOMINATORS = 3
MIN_AT_RUNG = 5
#: Seconds a snapshot of the trials at a rung serves the members of one population.
_SNAPSHOT_SECONDS = 2.0


def rungs(epochs: int) -> set[int]:
    """Epochs 1, 2, 4, 8, ... before the last."""
    out, epoch = set(), 1
    while epoch < epochs:
        out.add(epoch)
        epoch *= 2
    return out


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(accuracy, parameters) ``a`` dominates ``b``: no worse in both, better in one."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


class DominanceRule:
    """The ``dominated`` rule for one worker's trials of one study."""

    def __init__(self, study: optuna.Study, ledger: Ledger, epochs: int) -> None:
        self.study, self.ledger, self.rungs = study, ledger, rungs(epochs)
        self._by_trial: dict[int, dict[int, tuple[float, float]]] = {}
        # what this worker recorded since: members of one population reach a rung together
        self._local: dict[int, dict[int, tuple[float, float]]] = {}
        self._taken = -_SNAPSHOT_SECONDS

    def reporter(self, trial: optuna.Trial) -> Callable[[EpochStats], None]:
        def check(stats: EpochStats) -> None:
            if stats.epoch not in self.rungs:
                return
            mine = (stats.val_accuracy, float(stats.active_params))
            key = rung_attr(stats.epoch)
            self.ledger.guarded("recording a rung", lambda: trial.set_user_attr(key, list(mine)))
            self._local.setdefault(trial.number, {})[stats.epoch] = mine
            others = self._at(stats.epoch, trial.number)
            beaten = sum(dominates(other, mine) for other in others)
            if len(others) >= MIN_AT_RUNG and beaten >= MIN_DOMINATORS:
                raise optuna.TrialPruned(
                    f"dominated at epoch {stats.epoch} by {beaten} of {len(others)} trials there"
                )

        return check

    def _at(self, epoch: int, number: int) -> list[tuple[float, float]]:
        """(accuracy, parameters) of the other trials at ``epoch``'s rung, from a snapshot of
        the study that serves the members of one population."""
        if time.monotonic() - self._taken > _SNAPSHOT_SECONDS:
            trials: Any = self.ledger.db(
                "reading the rungs", lambda: self.study.get_trials(deepcopy=False)
            )
            self._by_trial = {t.number: rungs_of(t.user_attrs) for t in trials}
            self._local = {}
            self._taken = time.monotonic()
        seen = {n: {**r, **self._local.get(n, {})} for n, r in self._by_trial.items()}
        seen.update({n: r for n, r in self._local.items() if n not in seen})
        return [r[epoch] for n, r in seen.items() if n != number and epoch in r]
