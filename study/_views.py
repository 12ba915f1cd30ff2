"""What a finished trial says about pruning and step sizes, read from its stored attributes.

Shared by the dashboard figures and the report; pure functions of the stored trials.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tauopt.storage import pareto_front
from tauopt.study._record import TrialRecord


@dataclass(frozen=True)
class TrialView:
    """One COMPLETE trial, as the figures and the report need it: its record, and where it
    stands in the study."""

    number: int
    record: TrialRecord
    feasible: bool
    pareto: bool = False
    params: dict[str, Any] | None = None

    @property
    def config(self) -> dict[str, Any]:
        return self.record.train_config

    @property
    def grid(self) -> dict[str, Any] | None:
        """Coordinates in the grid of ``tauopt reproduce`` (None in a search study)."""
        return self.record.grid_point

    @property
    def val_accuracy(self) -> float:
        """Final validation accuracy (NaN without validation images)."""
        value = self.record.val_accuracy
        return float("nan") if value is None else value

    @property
    def test_accuracy(self) -> float:
        return self.record.test_accuracy

    @property
    def active_params(self) -> int:
        return self.record.active_params

    @property
    def initial_params(self) -> int:
        return self.record.initial_params

    @property
    def depth(self) -> int:
        return int(self.config.get("depth", len(self.record.taus)))

    @property
    def tau_history(self) -> list[list[float]]:
        return self.record.tau_history

    @property
    def epoch_seconds(self) -> list[float]:
        return self.record.epoch_seconds

    @property
    def pruned(self) -> list[dict[str, int]]:
        return self.record.pruned_layers

    @property
    def test_history(self) -> list[float]:
        return self.record.test_accuracy_history

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

    def blocks_before_pruning(self) -> list[int]:
        """Active blocks during each epoch (pruning runs after the epoch is recorded)."""
        return [sum(1 for tau in taus if tau != 0.0) for taus in self.tau_history]


def view_of(
    number: int,
    record: TrialRecord,
    *,
    feasible: bool,
    pareto: bool = False,
    params: dict[str, Any] | None = None,
) -> TrialView:
    return TrialView(number, record, feasible, pareto, params)


def _view(trial: FrozenTrial, front: set[int]) -> TrialView:
    return view_of(
        trial.number,
        TrialRecord.from_attrs(trial.user_attrs),
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
        return {t.number for t in pareto_front(trials, study.directions)}
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


def settings_line(view: TrialView) -> str:
    """What the run trained, in one line: the network, dataset and every setting that tells
    it from its neighbours."""
    c = view.config
    parts = [f"{c.get('arch')} on {c.get('dataset')}", f"T={c.get('T'):g}"]
    if c.get("fixed_tau"):
        parts.append("fixed taus")
    else:
        parts.append("input tau fixed" if c.get("fixed_input_tau") else "trainable taus")
    parts.append(f"l1 {c.get('l1'):g}" if c.get("l1") else "no l1")
    if c.get("horizon_weight"):
        parts.append(f"horizon penalty {c['horizon_weight']:g}")
    if c.get("dependent_last_tau"):
        parts.append("dependent last tau")
    if c.get("projected_last_tau"):
        parts.append("projected last tau")
    if c.get("prune_eps") is not None:
        parts.append(f"pruning {c.get('prune_rule', 'all')} < {c['prune_eps']:g}")
    if c.get("arch") == "fracdnn":
        memory = "detached" if c.get("detach_memory") else "full"
        parts.append(f"gamma {c.get('gamma'):g}, {memory} memory")
    parts.append(f"lr {c.get('lr'):g}, seed {c.get('seed')}")
    return ", ".join(parts)


def _cell(values: list[float], epoch: int, fmt: str = ".4f") -> str:
    return format(values[epoch], fmt) if epoch < len(values) else "-"


def _resume_point(point: dict[str, int]) -> str:
    epoch, batch = point.get("epoch", 0), point.get("batch", 0)
    return f"after epoch {epoch}" + (f", batch {batch} of epoch {epoch + 1}" if batch else "")


def trial_note(view: TrialView) -> str:
    """Markdown for the dashboard's note of one trial: its settings, the per-epoch records
    (accuracies, clean loss, penalties, taus), pruning and its savings."""
    r = view.record
    lines = [f"### Trial {view.number}: {settings_line(view)}", ""]
    val = f"validation accuracy {view.val_accuracy:.4f}, " if r.val_accuracy is not None else ""
    train = f", training accuracy {r.train_accuracy:.4f}" if r.train_accuracy is not None else ""
    lines.append(
        f"{val}test accuracy {view.test_accuracy:.4f}{train}".capitalize()
        + ("" if view.feasible else " (**infeasible**: below the study's min_val_accuracy)")
    )
    if r.resumed_from:
        points = "; ".join(_resume_point(p) for p in r.resumed_from)
        lines += ["", f"**Resumed** from a saved state after a stop: {points}."]
    lines += ["", "**Per epoch** (a tau is 0 once its block is removed)", ""]
    taus = [f"tau_{b}" for b in range(view.depth)]
    head = ["epoch", "train acc", "val acc", "test acc", "clean loss", "l1 term", "horizon term"]
    lines += ["| " + " | ".join(head + taus) + " |", "|---" * (len(head) + len(taus)) + "|"]
    l1 = [p.get("l1", 0.0) for p in r.penalty_history]
    horizon = [p.get("horizon", 0.0) for p in r.penalty_history]
    for e, row in enumerate(view.tau_history):
        cells = [
            str(e + 1),
            _cell(r.train_accuracy_history, e),
            _cell(r.val_accuracy_history, e),
            _cell(r.test_accuracy_history, e),
            _cell(r.clean_loss_history, e),
            _cell(l1, e, ".3g"),
            _cell(horizon, e, ".3g"),
            *(f"{t:.4g}" for t in row),
        ]
        lines.append("| " + " | ".join(cells) + " |")
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
