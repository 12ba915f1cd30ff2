"""Anchor trials: a Pareto study's first trials, placed where its search space prunes most.

The hypervolume of the accuracy-against-parameters front lies almost all at its small end: a
network pruned to one or two blocks that is still accurate. A sampler's first trials are
random and rarely prune, so a study's first minutes often have no front at all (see "The front
per hour" in docs/benchmarks.md). ``tauopt create`` therefore enqueues ``study.anchors`` trials
when it makes a Pareto study:

* the ResNet (a fractional block never prunes), at the highest ``layer_prune_eps`` searched;
* ``time_reg = "none"`` where it is a choice (the dependent last tau keeps its block alive);
* learning rates spread over the upper half of the searched range, one per anchor.

Every other parameter is drawn by the sampler as usual. Anchors are ordinary trials: they count
toward ``n_trials`` (never more than it), are claimed first, and train, stop and store like any
other. A search space that cannot prune (no ResNet, or ``layer_prune_eps`` absent) gets none.
"""

from __future__ import annotations

from typing import Any

import optuna

from tauopt.storage import access, storage_of, study_id
from tauopt.study._config import SearchParam, StudyConfig
from tauopt.study._ledger import budget_used
from tauopt.study._record import ANCHOR_ATTR, ANCHORS_ATTR, FAIL_REASON_ATTR


def anchor_params(config: StudyConfig) -> list[dict[str, Any]]:
    """The fixed parameters of each anchor trial (empty where the study gets none)."""
    if config.objective != "pareto" or config.anchors == 0:
        return []
    search = config.search
    fixed: dict[str, Any] = {}
    arch = search["arch"]
    if arch.choices is not None:
        if "resnet" not in arch.choices:
            return []
        fixed["arch"] = "resnet"
    elif arch.fixed != "resnet":
        return []
    eps = search["layer_prune_eps"]
    if eps.fixed is None:
        fixed["layer_prune_eps"] = max(eps.choices) if eps.choices else eps.high
    time_reg = search["time_reg"]
    if time_reg.choices is not None and "none" in time_reg.choices:
        fixed["time_reg"] = "none"
    n = min(config.anchors, config.n_trials)
    return [{**fixed, **_spread(search["lr"], i, n)} for i in range(n)]


def _spread(param: SearchParam, i: int, n: int) -> dict[str, Any]:
    """The ``i``-th of ``n`` values spread over the upper half of ``param`` (a learning rate):
    the middles of ``n`` equal parts of a range's upper half on its log scale, or the upper
    half's choices in turn; nothing for a fixed value. The upper half because a network pruned
    to a block or two in a study's few epochs trains furthest with large steps (measured in
    docs/benchmarks.md)."""
    if param.choices is not None:
        ordered = sorted(param.choices)
        upper = ordered[len(ordered) // 2 :]
        return {param.name: upper[i * len(upper) // n]}
    if param.low is None or param.high is None:
        return {}
    at = 0.5 + (i + 0.5) / (2 * n)  # a learning rate's range is always log (it excludes 0)
    return {param.name: round(param.low * (param.high / param.low) ** at, 6)}


def enqueue_anchors(study: optuna.Study, config: StudyConfig) -> int:
    """Enqueue the anchors still missing, within the budget; returns how many this call added.

    Called under the study's lock by ``create``: once when it makes the study, and again by a
    ``create`` that finds a study whose anchors were planned but not all enqueued (a storage
    failure in between). A study made before anchors existed has none planned and gets none.
    """
    storage = storage_of(study)
    sid = study_id(study)
    planned = storage.get_study_user_attrs(sid).get(ANCHORS_ATTR)
    if planned is None or planned["complete"]:
        return 0
    present = {t.user_attrs.get(ANCHOR_ATTR) for t in study.get_trials(deepcopy=False)}
    counts, own_failures = access(storage).counts(sid, failed_with_attr=FAIL_REASON_ATTR)
    room = config.n_trials - budget_used(counts, own_failures)
    added = 0
    for index, params in enumerate(planned["params"]):
        if index in present:
            continue
        if added >= room:
            break
        study.enqueue_trial(params=params, user_attrs={ANCHOR_ATTR: index}, skip_if_exists=False)
        added += 1
    study.set_user_attr(ANCHORS_ATTR, {**planned, "complete": True})
    return added


def plan_anchors(study: optuna.Study, config: StudyConfig) -> None:
    """Record the anchors a new study is to get, before any is enqueued (none: nothing)."""
    params = anchor_params(config)
    if params:
        study.set_user_attr(ANCHORS_ATTR, {"params": params, "complete": False})
