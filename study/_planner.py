"""The planner: claimed trials into training configs, and those into groups of one shape that
train together as one population (see :func:`tauopt.engine.train_population`)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from tauopt.engine import RunState, TrainConfig, group_key
from tauopt.storage import RETRIED_FROM, as_claimed, trial_id
from tauopt.study._config import StudyConfig
from tauopt.study._ledger import Claim, Ledger
from tauopt.study._objective import suggest_config
from tauopt.study._record import (
    ANCHOR_ATTR,
    RUN_KEY_ATTR,
    SAVED_STATE_ATTR,
    STARTED_FROM_ATTR,
    WORKER_ATTR,
    grid_config,
)
from tauopt.study._resume import new_run_key, valid_run_key


@dataclass(frozen=True)
class Planned:
    """A claimed trial and what it trains; ``grid``: a fixed run of ``tauopt reproduce``;
    ``anchor``: placed by ``create`` (``study.anchors``), not drawn. ``run_key`` names its saved
    state, shared with its retries (None: an attribute that is not a key; nothing is saved);
    ``first_number`` is its first attempt's number; ``saved_at`` where its record says its
    latest state stands; ``resume`` the state it goes on from, once loaded."""

    claim: Claim
    config: TrainConfig
    grid: bool
    anchor: bool
    run_key: str | None = None
    first_number: int = 0
    saved_at: tuple[int, int] | None = None
    resume: RunState | None = None

    @property
    def point(self) -> tuple[int, int]:
        """Where it starts: (epochs done, batches of the next done)."""
        return (0, 0) if self.resume is None else self.resume.point

    @property
    def trial(self) -> optuna.Trial:
        return self.claim.trial


@dataclass(frozen=True)
class Group:
    """Trials that train together: one shape, one dataset, grid runs or searched ones."""

    members: list[Planned]

    @property
    def grid(self) -> bool:
        return self.members[0].grid

    @property
    def name(self) -> str:
        numbers = ", ".join(str(p.trial.number) for p in self.members)
        return f"trials {numbers}" if len(self.members) > 1 else f"trial {numbers}"


class Planner:
    """Fixes each claimed trial's config (suggested, or stored by ``tauopt reproduce``) and
    groups them. ``grid_choices`` are the grid's factors with their values: a grid run's
    coordinates are suggested from them, so that they show as its parameters. ``precision``,
    where given, is this worker's choice for every trial it trains (the record keeps it)."""

    def __init__(
        self,
        ledger: Ledger,
        config: StudyConfig,
        grid_choices: dict[str, list[Any]] | None,
        *,
        precision: str | None = None,
    ) -> None:
        self.ledger, self.config, self.grid_choices = ledger, config, grid_choices
        self.precision = precision
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def prepare(self, claim: Claim) -> Planned:
        """The trial's training config; a retried trial keeps the seed of the trial it
        retries, so the rerun is the same run."""
        trial = claim.trial
        # its attributes as at its claim: Optuna read them to make the trial
        stored: Any = as_claimed(trial) or self.ledger.db(
            "reading the trial", lambda: self.ledger.storage.get_trial(trial_id(trial))
        )
        seed = first = int(stored.system_attrs.get(RETRIED_FROM, trial.number))
        fixed = grid_config(stored.user_attrs)
        if fixed is not None:
            self._suggest_coordinates(trial)
            config = fixed
        else:
            config = self._guarded(lambda: self._drawn(trial, seed))
        if self.precision is not None:
            config = config.replace(precision=self.precision)
        # Recorded once the parameters are fixed: a retry of this trial reruns them, and
        # inherits the run key (a first attempt gets one here).
        key = stored.user_attrs.get(RUN_KEY_ATTR)
        saved = stored.user_attrs.get(SAVED_STATE_ATTR)
        # where this attempt starts (a retry inherits its predecessor's: written again)
        attrs: dict[str, Any] = {WORKER_ATTR: self.worker, STARTED_FROM_ATTR: saved}
        if key is None:
            key = attrs[RUN_KEY_ATTR] = new_run_key()
        tid = trial_id(trial)
        self.ledger.guarded(
            "recording the worker",
            lambda: self.ledger.access.set_trial_attrs(tid, user=attrs, system={}),
        )
        return Planned(
            claim,
            config,
            fixed is not None,
            ANCHOR_ATTR in stored.user_attrs,
            run_key=key if valid_run_key(key) else None,
            first_number=first,
            saved_at=_point(saved),
        )

    def _drawn(self, trial: optuna.Trial, seed: int) -> TrainConfig:
        # the parameters written together as the drawing ends (through the proxy, one call)
        with self.ledger.access.params_together(trial_id(trial)):
            return suggest_config(trial, self.config, seed=seed)

    def _guarded(self, fn: Callable[[], TrainConfig]) -> TrainConfig:
        result: Any = self.ledger.guarded("reading the trial's parameters", fn)
        return result  # type: ignore[no-any-return]

    def _suggest_coordinates(self, trial: optuna.Trial) -> None:
        """A grid run's coordinates, enqueued as fixed parameters, as its parameters."""
        for name, choices in (self.grid_choices or {}).items():
            self.ledger.guarded("reading the trial's parameters", _suggester(trial, name, choices))

    @staticmethod
    def groups(planned: list[Planned]) -> list[Group]:
        """Trials of one :func:`group_key` (and grid runs apart from searched ones) together,
        in the order they were claimed."""
        by_key: dict[tuple[object, ...], list[Planned]] = {}
        for p in planned:  # members go on from one point together
            by_key.setdefault((*group_key(p.config), p.grid, p.point), []).append(p)
        return [Group(members) for members in by_key.values()]


def _point(saved: object) -> tuple[int, int] | None:
    """A ``SAVED_STATE_ATTR`` value as (epoch, batch), None where it is not one."""
    if not isinstance(saved, dict):
        return None
    epoch, batch = saved.get("epoch"), saved.get("batch", 0)
    if isinstance(epoch, int) and isinstance(batch, int):
        return (epoch, batch)
    return None


def _suggester(trial: optuna.Trial, name: str, choices: list[Any]) -> Callable[[], object]:
    def suggest() -> object:
        return trial.suggest_categorical(name, choices)

    return suggest
