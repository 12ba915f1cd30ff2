"""What counts against a study's budget, and the attribute names the workers store."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

CONFIG_ATTR = "tauopt_config"
#: Why a trial failed through its own fault (diverged, invalid parameters): it uses budget.
FAIL_REASON_ATTR = "fail_reason"
#: Why a trial was failed and queued again through no fault of its own (its worker stopped,
#: its model could not be saved): it uses no budget, and its retry reruns the same parameters.
RETRY_REASON_ATTR = "retry_reason"
ARTIFACT_ATTR = "model_artifact_id"
WORKER_ATTR = "worker"
_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Trials that use up budget: all but failures that were not the trial's fault (a dead or
    stopped worker, a storage or disk failure); those are retried instead."""
    return trial.state in _COUNTED or (
        trial.state == TrialState.FAIL and FAIL_REASON_ATTR in trial.user_attrs
    )


def trials_used(trials: list[optuna.trial.FrozenTrial]) -> int:
    """How much of the budget ``trials`` have used (see :func:`counted`)."""
    return sum(counted(t) for t in trials)


def budget_used(counts: dict[str, int], failures_with_reason: int) -> int:
    """:func:`trials_used` from state counts (see ``tauopt.storage.trial_counts``)."""
    return sum(counts.get(state.name, 0) for state in _COUNTED) + failures_with_reason
