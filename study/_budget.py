"""What counts against a study's budget, and the attribute names the workers store."""

from __future__ import annotations

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


def budget_used(counts: dict[str, int], failures_with_reason: int) -> int:
    """The trials that use up a study's budget, from its trials per state and the failed ones
    carrying ``FAIL_REASON_ATTR`` (see ``tauopt.storage.trial_counts``): every trial but the
    failures that were not its fault (a dead or stopped worker, a storage or disk failure),
    which are retried instead."""
    return sum(counts.get(state.name, 0) for state in _COUNTED) + failures_with_reason
