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
    stands in the study (what it trained and measured: ``record``)."""

    number: int
    record: TrialRecord
    feasible: bool
    pareto: bool = False
    params: dict[str, Any] | None = None


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
    c = view.record.config
    parts = [f"{c.arch} on {c.dataset}", f"T={c.T:g}"]
    if c.fixed_tau:
        parts.append("fixed taus")
    else:
        parts.append("input tau fixed" if c.fixed_input_tau else "trainable taus")
    parts.append(f"l1 {c.l1:g}" if c.l1 else "no l1")
    if c.horizon_weight:
        parts.append(f"horizon penalty {c.horizon_weight:g}")
    if c.dependent_last_tau:
        parts.append("dependent last tau")
    if c.projected_last_tau:
        parts.append("projected last tau")
    if c.prune_eps is not None:
        parts.append(f"pruning {c.prune_rule} < {c.prune_eps:g}")
    if c.arch == "fracdnn":
        memory = "detached" if c.detach_memory else "full"
        parts.append(f"gamma {c.gamma:g}, {memory} memory")
    parts.append(f"lr {c.lr:g}, seed {c.seed}")
    return ", ".join(parts)


def _cell(values: list[float], epoch: int, fmt: str = ".4f") -> str:
    return format(values[epoch], fmt) if epoch < len(values) else "-"


def _resume_point(point: dict[str, int]) -> str:
    epoch, batch = point.get("epoch", 0), point.get("batch", 0)
    return f"after epoch {epoch}" + (f", batch {batch} of epoch {epoch + 1}" if batch else "")


def trial_note(view: TrialView) -> str:
    """Markdown for the dashboard's note of one trial: its settings, the per-epoch records
    (accuracies, clean loss, penalties, taus), pruning and its savings."""
    r, h = view.record, view.record.history
    lines = [f"### Trial {view.number}: {settings_line(view)}", ""]
    val = f"validation accuracy {r.val_accuracy:.4f}, " if r.val_accuracy is not None else ""
    train = f", training accuracy {r.train_accuracy:.4f}" if r.train_accuracy is not None else ""
    lines.append(
        f"{val}test accuracy {r.test_accuracy:.4f}{train}".capitalize()
        + ("" if view.feasible else " (**infeasible**: below the study's min_val_accuracy)")
    )
    if h.resumed_from:
        points = "; ".join(_resume_point(p) for p in h.resumed_from)
        lines += ["", f"**Resumed** from a saved state after a stop: {points}."]
    lines += ["", "**Per epoch** (a tau is 0 once its block is removed)", ""]
    taus = [f"tau_{b}" for b in range(r.config.depth)]
    head = ["epoch", "train acc", "val acc", "test acc", "clean loss", "l1 term", "horizon term"]
    lines += ["| " + " | ".join(head + taus) + " |", "|---" * (len(head) + len(taus)) + "|"]
    l1 = [p.get("l1", 0.0) for p in h.penalties]
    horizon = [p.get("horizon", 0.0) for p in h.penalties]
    for e, row in enumerate(h.taus):
        cells = [
            str(e + 1),
            _cell(h.train_accuracy, e),
            _cell(h.val_accuracy, e),
            _cell(h.test_accuracy, e),
            _cell(h.clean_loss, e),
            _cell(l1, e, ".3g"),
            _cell(horizon, e, ".3g"),
            *(f"{t:.4g}" for t in row),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if not h.pruned:
        lines.append("**Pruning:** no block was removed.")
        return "\n".join(lines)
    events = ", ".join(f"block {e.block} after epoch {e.epoch}" for e in h.pruned)
    lines.append(f"**Pruning:** {events}.")
    lines.append(
        f"Parameters {r.initial_params:,} -> {r.active_params:,} ({r.params_removed:.1%} removed)."
    )
    first = min(e.epoch for e in h.pruned)
    before, after = h.epoch_seconds[:first], h.epoch_seconds[first:]
    if before and after:
        b, a = sum(before) / len(before), sum(after) / len(after)
        lines.append(
            f"Seconds per epoch: {b:.3f} before pruning, {a:.3f} after ({a / b - 1:+.0%})."
        )
    return "\n".join(lines)
