"""What a finished trial says about pruning and step sizes, read from its stored attributes.

Shared by the dashboard figures and the report; pure functions of the stored trials.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.study._constrained_optimization import _is_constrained_optimization
from optuna.study._multi_objective import _get_pareto_front_trials_by_trials
from optuna.trial import FrozenTrial, TrialState

from tauopt.engine import TrainConfig, parameter_count

#: MNIST and Fashion-MNIST: 28 x 28 pixels, 10 classes.
_IN_FEATURES, _CLASSES = 784, 10


@dataclass(frozen=True)
class TrialView:
    """One COMPLETE trial, as the figures and the report need it."""

    number: int
    feasible: bool
    pareto: bool
    val_accuracy: float
    test_accuracy: float
    active_params: int
    initial_params: int
    depth: int
    tau_history: list[list[float]]
    epoch_seconds: list[float]
    pruned: list[dict[str, int]]
    config: dict[str, Any]
    test_history: list[float]
    val_history: list[float]
    #: Coordinates in the grid of ``tauopt reproduce`` (None in a search study).
    grid: dict[str, Any] | None = None
    params: dict[str, Any] | None = None

    @property
    def blocks_removed(self) -> int:
        return len(self.pruned)

    @property
    def params_removed(self) -> float:
        """Share of the unpruned network's parameters that pruning removed, 0..1."""
        return 1.0 - self.active_params / self.initial_params if self.initial_params else 0.0

    @property
    def arch(self) -> str:
        return str(self.config.get("arch", "resnet"))

    def active_blocks_per_epoch(self) -> list[int]:
        return [sum(1 for tau in taus if tau != 0.0) for taus in self.tau_history]


def view_from(
    number: int,
    attrs: dict[str, Any],
    *,
    feasible: bool,
    pareto: bool = False,
    params: dict[str, Any] | None = None,
) -> TrialView:
    """The view of trial ``number`` from its user attributes (a worker has them in hand)."""
    config = dict(attrs.get("train_config", {}))
    initial = attrs.get("initial_params")  # absent on trials stored by earlier versions
    if not initial:
        initial = parameter_count(TrainConfig(**config), _IN_FEATURES, _CLASSES)
    return TrialView(
        number=number,
        feasible=feasible,
        pareto=pareto,
        val_accuracy=float(attrs.get("val_accuracy", 0.0)),
        test_accuracy=float(attrs.get("test_accuracy", 0.0)),
        active_params=int(attrs.get("active_params", 0)),
        initial_params=int(initial),
        depth=int(config.get("depth", len(attrs.get("taus", [])))),
        tau_history=[list(map(float, row)) for row in attrs.get("tau_history", [])],
        epoch_seconds=[float(s) for s in attrs.get("epoch_seconds", [])],
        pruned=list(attrs.get("pruned_layers", [])),
        config=config,
        test_history=[float(a) for a in attrs.get("test_accuracy_history", [])],
        val_history=[float(a) for a in attrs.get("val_accuracy_history", [])],
        grid=attrs.get("grid_point"),
        params=params,
    )


def _view(trial: FrozenTrial, front: set[int]) -> TrialView:
    return view_from(
        trial.number,
        trial.user_attrs,
        feasible=all(v <= 0.0 for v in trial.constraints.values()),
        pareto=trial.number in front,
        params=dict(trial.params),
    )


def front_numbers(study: optuna.Study) -> set[int]:
    """Numbers of the feasible Pareto-optimal trials (or the best one of one objective)."""
    trials = study.get_trials(deepcopy=False)
    if not any(t.state == TrialState.COMPLETE for t in trials):
        return set()
    if len(study.directions) > 1:
        # ``study.best_trials``' own rule, on the trials in hand: it deep-copies every trial
        # of the study first (a second per call at 5,000 trials).
        constrained = _is_constrained_optimization(trials)
        front = _get_pareto_front_trials_by_trials(trials, study.directions, constrained)
        return {t.number for t in front}
    try:
        return {study.best_trial.number}
    except ValueError:  # no feasible trial yet
        return set()


def trial_views(
    study: optuna.Study, trials: Sequence[FrozenTrial] | None = None
) -> list[TrialView]:
    """Every COMPLETE trial of ``study`` (or of ``trials``) as a :class:`TrialView`."""
    front = front_numbers(study)
    chosen = trials if trials is not None else study.get_trials(deepcopy=False)
    return [_view(t, front) for t in chosen if t.state == TrialState.COMPLETE]


def trial_note(view: TrialView) -> str:
    """Markdown for the dashboard's note of one trial: taus per epoch, pruning, savings."""
    lines = [f"### Trial {view.number}: {view.arch}, {view.depth} blocks", ""]
    lines.append(
        f"Validation accuracy {view.val_accuracy:.4f}, test accuracy {view.test_accuracy:.4f}"
        + ("" if view.feasible else " (**infeasible**: below the study's min_val_accuracy)")
    )
    lines += ["", "**Step sizes per epoch** (0 once a block is removed)", ""]
    header = "| epoch | " + " | ".join(f"tau_{b}" for b in range(view.depth)) + " |"
    lines += [header, "|---" * (view.depth + 1) + "|"]
    for epoch, taus in enumerate(view.tau_history, start=1):
        lines.append(f"| {epoch} | " + " | ".join(f"{t:.4g}" for t in taus) + " |")
    lines.append("")
    if not view.pruned:
        lines.append("**Pruning:** no block was removed.")
        return "\n".join(lines)
    events = ", ".join(f"block {e['block']} after epoch {e['epoch']}" for e in view.pruned)
    lines.append(f"**Pruning:** {events}.")
    lines.append(
        f"Parameters {view.initial_params:,} -> {view.active_params:,} "
        f"({view.params_removed:.1%} removed)."
    )
    first = min(e["epoch"] for e in view.pruned)
    before, after = view.epoch_seconds[:first], view.epoch_seconds[first:]
    if before and after:
        b, a = sum(before) / len(before), sum(after) / len(after)
        lines.append(
            f"Seconds per epoch: {b:.3f} before pruning, {a:.3f} after ({a / b - 1:+.0%})."
        )
    return "\n".join(lines)
