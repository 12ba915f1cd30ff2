"""What a worker needs of its storage beyond Optuna's public storage API, in two kinds.

* :class:`DirectAccess`, on a database (SQLite, PostgreSQL): the fast path. Claims under a
  lock, trials counted in SQL, Optuna's heartbeat table, many attributes in one transaction
  (all from :mod:`tauopt.storage._optuna`).
* :class:`ProxyAccess`, through Optuna's gRPC storage proxy (``grpc://HOST:PORT``): no lock
  (a new trial past the budget fails itself, see :func:`over_budget`), heartbeats as a trial
  system attribute stamped with the worker's clock (the hosts' clocks must agree within the
  grace period, as NTP keeps them). Where the proxy is ``tauopt proxy``, its own service
  (:mod:`tauopt.storage._service`) takes many attributes in one call and answers the claim's
  questions (dead trials, counts, past the budget) in SQL; through a proxy without it, Optuna's
  storage API alone: one call per attribute, and the answers from the study's trials.
"""

from __future__ import annotations

import contextlib
import datetime
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import optuna
from optuna.trial import FrozenTrial, TrialState

from tauopt.storage import _optuna as private
from tauopt.storage._proxy import ProxyClient
from tauopt.storage._rdb import study_lock
from tauopt.storage._service import (
    HEARTBEAT_ATTR,
    OVER_BUDGET_ATTR,
    ServiceClient,
    dead_by_stamp,
    past_budget_in_sql,
    set_budget_in_sql,
    set_study_system_attrs_one_by_one,
    set_trial_attrs_one_by_one,
)

__all__ = ["HEARTBEAT_ATTR", "OVER_BUDGET_ATTR", "DirectAccess", "ProxyAccess", "access"]
_COUNTED = ("COMPLETE", "PRUNED", "RUNNING", "WAITING")


@dataclass(frozen=True)
class ClaimView:
    """What a claim reads of its study before it takes trials, as one answer: the dead
    trials (id -> (number, why)), the budget as stored now, the trials per state and the
    failures that count (``failed_with_attr``), and the waiting trials' ids by number."""

    dead: dict[int, tuple[int, str]]
    budget: int
    counts: dict[str, int]
    own_failures: int
    waiting: list[int]


def _at(attrs: Any, path: Sequence[str]) -> int:
    for key in path:
        attrs = attrs[key]
    return int(attrs)


def composed_view(
    access: StudyAccess,
    storage: optuna.storages.BaseStorage,
    study_id: int,
    grace: float,
    *,
    failed_with_attr: str,
    budget_at: Sequence[str],
) -> ClaimView:
    """A :class:`ClaimView` asked question by question."""
    dead = access.dead_trials(study_id, grace)
    budget = _at(storage.get_study_user_attrs(study_id), budget_at)
    counts, own = access.counts(study_id, failed_with_attr=failed_with_attr)
    waiting = access.waiting(study_id) if counts.get("WAITING", 0) else []
    return ClaimView(dead, budget, counts, own, waiting)


class StudyAccess(Protocol):
    """The storage operations of a worker that Optuna's storage API does not offer as such."""

    #: Whether claims are serialised by a lock (else a new trial checks its own place).
    locks: bool

    def lock(self, study_name: str) -> contextlib.AbstractContextManager[None]: ...

    def counts(self, study_id: int, *, failed_with_attr: str) -> tuple[dict[str, int], int]: ...

    def dead_trials(self, study_id: int, grace: float) -> dict[int, tuple[int, str]]: ...

    def waiting(self, study_id: int) -> list[int]:
        """The ids of the study's waiting trials, by number."""

    def new_trial(
        self, study: optuna.Study, *, failed_with_attr: str, budget_at: Sequence[str]
    ) -> tuple[optuna.Trial | None] | None:
        """A new trial made, with its first heartbeat, and checked against the budget in one
        call: (the trial,), or (None,) past the budget (failed, using none of it); None
        where that is not one call (the caller asks, beats and checks)."""

    def claim_view(
        self, study_id: int, grace: float, *, failed_with_attr: str, budget_at: Sequence[str]
    ) -> ClaimView:
        """What a claim reads first (:class:`ClaimView`), the budget at ``budget_at`` (an
        attribute of the study, then keys within it); through the proxy one call."""

    def beat(self, trial_ids: Sequence[int]) -> None:
        """Record a heartbeat of each of ``trial_ids`` (a trial finished meanwhile is left
        alone)."""

    def params_together(self, trial_id: int) -> contextlib.AbstractContextManager[None]:
        """Within it, the parameters the trial draws may be written together as it ends
        (through the proxy: one call for them all)."""

    def set_trial_attrs(
        self, trial_id: int, *, user: dict[str, Any], system: dict[str, Any]
    ) -> None: ...

    def set_study_system_attrs(
        self, study_id: int, attrs: dict[str, Any], *, clear_prefix: str | None = None
    ) -> None: ...

    def retry(self, study: optuna.Study, trial: FrozenTrial) -> None: ...

    def past_budget(
        self,
        study_id: int,
        trial_id: int,
        n_trials: int,
        *,
        failed_with_attr: str,
        budget_at: Sequence[str] | None = None,
    ) -> bool:
        """Whether new trial ``trial_id`` came past the budget (:func:`over_budget`): the
        budget read from the study at ``budget_at`` (an attribute, then keys within it) where
        given, as it is now, else ``n_trials``."""

    def set_budget(
        self, study_id: int, key: str, value: Any, n_trials: int, *, failed_with_attr: str
    ) -> int:
        """Store ``value``, which holds the budget ``n_trials``, as the study's user attribute
        ``key`` unless the study has used more trials than that; returns the trials used. On a
        database the caller holds the study's lock; through ``tauopt proxy`` the proxy takes
        it (through another proxy, nothing does)."""


class DirectAccess:
    """The fast path on a database."""

    locks = True

    def __init__(
        self, storage: optuna.storages.BaseStorage, log: Callable[[str], None] | None = None
    ) -> None:
        self.rdb = private.rdb_of(storage)
        self.log = log

    def lock(self, study_name: str) -> contextlib.AbstractContextManager[None]:
        if self.log is None:
            return study_lock(self.rdb, study_name)
        return study_lock(self.rdb, study_name, log=self.log)

    def counts(self, study_id: int, *, failed_with_attr: str) -> tuple[dict[str, int], int]:
        return private.trial_counts(self.rdb, study_id, failed_with_attr=failed_with_attr)

    def dead_trials(self, study_id: int, grace: float) -> dict[int, tuple[int, str]]:
        """Running trials whose heartbeat went silent (Optuna's rule), or that never sent one
        and started more than ``grace`` seconds ago: id -> (number, why)."""
        running = private.running_trials(self.rdb, study_id)
        silent = set(private.stale_trial_ids(self.rdb, study_id)) & set(running)
        limit = datetime.datetime.now() - datetime.timedelta(seconds=grace)
        old = [i for i, (_, start) in running.items() if start is not None and start < limit]
        never = set(old) - silent - private.with_heartbeat(self.rdb, old)
        out = {i: (running[i][0], "its heartbeat went silent") for i in silent}
        out.update({i: (running[i][0], "never sent a heartbeat") for i in never})
        return out

    def waiting(self, study_id: int) -> list[int]:
        return private.waiting_trial_ids(self.rdb, study_id)

    def new_trial(
        self, study: optuna.Study, *, failed_with_attr: str, budget_at: Sequence[str]
    ) -> tuple[optuna.Trial | None] | None:
        return None  # under the study's lock: ask() and the check are no race

    def claim_view(
        self, study_id: int, grace: float, *, failed_with_attr: str, budget_at: Sequence[str]
    ) -> ClaimView:
        return composed_view(
            self, self.rdb, study_id, grace, failed_with_attr=failed_with_attr, budget_at=budget_at
        )

    def beat(self, trial_ids: Sequence[int]) -> None:
        for trial_id in trial_ids:
            self.rdb.record_heartbeat(trial_id)

    def params_together(self, trial_id: int) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def set_trial_attrs(
        self, trial_id: int, *, user: dict[str, Any], system: dict[str, Any]
    ) -> None:
        private.set_trial_attrs(self.rdb, trial_id, user=user, system=system)

    def set_study_system_attrs(
        self, study_id: int, attrs: dict[str, Any], *, clear_prefix: str | None = None
    ) -> None:
        private.set_study_system_attrs(self.rdb, study_id, attrs, clear_prefix=clear_prefix)

    def retry(self, study: optuna.Study, trial: FrozenTrial) -> None:
        callback = self.rdb.get_heartbeat_stale_trial_callback()
        if callback is not None:
            callback(study, trial)

    def past_budget(
        self,
        study_id: int,
        trial_id: int,
        n_trials: int,
        *,
        failed_with_attr: str,
        budget_at: Sequence[str] | None = None,
    ) -> bool:
        """See :func:`over_budget` (claims under the lock come past it only where a holder
        lost the lock, or the budget was lowered)."""
        return past_budget_in_sql(
            self.rdb,
            study_id,
            trial_id,
            n_trials,
            failed_with_attr=failed_with_attr,
            budget_at=budget_at,
        )

    def set_budget(
        self, study_id: int, key: str, value: Any, n_trials: int, *, failed_with_attr: str
    ) -> int:
        return set_budget_in_sql(
            self.rdb, study_id, key, value, n_trials, failed_with_attr=failed_with_attr
        )


class ProxyAccess:
    """Through Optuna's gRPC storage proxy: the public storage API only."""

    locks = False

    def __init__(self, storage: optuna.storages.BaseStorage, *, max_retry: int) -> None:
        self.storage = storage
        self._read: tuple[int, float, list[FrozenTrial]] | None = None
        with warnings.catch_warnings():  # experimental; relied on knowingly, as on a database
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    @contextlib.contextmanager
    def lock(self, study_name: str) -> Iterator[None]:
        yield  # nothing to lock: a new trial past the budget fails itself

    def _trials(self, study_id: int) -> list[FrozenTrial]:
        """The study's trials, read once for a claim's checks (a claim first fails dead
        trials, then counts: one read of the proxy's cache serves both)."""
        now = time.monotonic()
        if self._read is None or self._read[0] != study_id or now - self._read[1] > 0.5:
            self._read = (study_id, now, self.storage.get_all_trials(study_id, deepcopy=False))
        return self._read[2]

    def _service(self) -> ServiceClient | None:
        return self.storage.service if isinstance(self.storage, ProxyClient) else None

    def counts(self, study_id: int, *, failed_with_attr: str) -> tuple[dict[str, int], int]:
        service = self._service()
        answer = service.counts(study_id, failed_with_attr=failed_with_attr) if service else None
        if answer is not None:
            return answer
        trials = self._trials(study_id)
        return state_counts(trials), sum(
            t.state == TrialState.FAIL and failed_with_attr in t.user_attrs for t in trials
        )

    def dead_trials(self, study_id: int, grace: float) -> dict[int, tuple[int, str]]:
        service = self._service()
        answer = service.dead_trials(study_id, grace) if service else None
        if answer is not None:
            return answer
        self._read = None  # a claim starts here: read afresh
        running = [t for t in self._trials(study_id) if t.state == TrialState.RUNNING]
        stamps = (
            (
                private.trial_id(t),
                t.number,
                t.datetime_start.timestamp() if t.datetime_start else None,
                t.system_attrs.get(HEARTBEAT_ATTR),
            )
            for t in running
        )
        return dead_by_stamp(stamps, time.time(), grace)

    def waiting(self, study_id: int) -> list[int]:
        service = self._service()
        answer = service.waiting_trial_ids(study_id) if service else None
        if answer is not None:
            return answer
        waiting = self.storage.get_all_trials(
            study_id, deepcopy=False, states=(TrialState.WAITING,)
        )
        return [private.trial_id(t) for t in waiting]

    def new_trial(
        self, study: optuna.Study, *, failed_with_attr: str, budget_at: Sequence[str]
    ) -> tuple[optuna.Trial | None] | None:
        if not isinstance(self.storage, ProxyClient):
            return None
        return self.storage.new_trial(study, failed_with_attr=failed_with_attr, budget_at=budget_at)

    def claim_view(
        self, study_id: int, grace: float, *, failed_with_attr: str, budget_at: Sequence[str]
    ) -> ClaimView:
        service = self._service()
        answer = (
            service.claim_view(
                study_id, grace, failed_with_attr=failed_with_attr, budget_at=budget_at
            )
            if service
            else None
        )
        if answer is not None:
            return ClaimView(**answer)
        return composed_view(
            self,
            self.storage,
            study_id,
            grace,
            failed_with_attr=failed_with_attr,
            budget_at=budget_at,
        )

    def past_budget(
        self,
        study_id: int,
        trial_id: int,
        n_trials: int,
        *,
        failed_with_attr: str,
        budget_at: Sequence[str] | None = None,
    ) -> bool:
        """See :func:`over_budget`."""
        service = self._service()
        answer = (
            service.past_budget(
                study_id, trial_id, n_trials, failed_with_attr=failed_with_attr, budget_at=budget_at
            )
            if service
            else None
        )
        if answer is not None:
            return answer
        if budget_at:
            value: Any = self.storage.get_study_user_attrs(study_id)
            for key in budget_at:
                value = value[key]
            n_trials = int(value)
        trials = self.storage.get_all_trials(study_id, deepcopy=False)
        mine = next(t for t in trials if private.trial_id(t) == trial_id)
        return over_budget(trials, mine, n_trials, failed_with_attr)

    def set_budget(
        self, study_id: int, key: str, value: Any, n_trials: int, *, failed_with_attr: str
    ) -> int:
        service = self._service()
        used = (
            service.set_budget(study_id, key, value, n_trials, failed_with_attr=failed_with_attr)
            if service
            else None
        )
        if used is not None:
            return used
        counts, own = self.counts(study_id, failed_with_attr=failed_with_attr)
        used = sum(counts.get(state, 0) for state in _COUNTED) + own
        if n_trials >= used:
            self.storage.set_study_user_attr(study_id, key, value)
        return used

    def params_together(self, trial_id: int) -> contextlib.AbstractContextManager[None]:
        if isinstance(self.storage, ProxyClient):
            return self.storage.params_together(trial_id)
        return contextlib.nullcontext()

    def beat(self, trial_ids: Sequence[int]) -> None:
        service = self._service()
        if service is not None and service.beat(list(trial_ids)):
            return  # one call for all of them
        for trial_id in trial_ids:
            try:
                self.storage.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # it finished between the worker's last look and this beat
            except Exception as e:
                if "already finished" not in str(e):
                    raise

    def set_trial_attrs(
        self, trial_id: int, *, user: dict[str, Any], system: dict[str, Any]
    ) -> None:
        service = self._service()
        if service is not None:
            service.set_trial_attrs(trial_id, user=user, system=system)
        else:
            set_trial_attrs_one_by_one(self.storage, trial_id, user=user, system=system)

    def set_study_system_attrs(
        self, study_id: int, attrs: dict[str, Any], *, clear_prefix: str | None = None
    ) -> None:
        service = self._service()
        if service is not None:
            service.set_study_system_attrs(study_id, attrs, clear_prefix=clear_prefix)
        else:
            set_study_system_attrs_one_by_one(
                self.storage, study_id, attrs, clear_prefix=clear_prefix
            )

    def retry(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.callback(study, trial)


def state_counts(trials: list[FrozenTrial]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def over_budget(
    trials: list[FrozenTrial], trial: FrozenTrial, n_trials: int, failed_with_attr: str
) -> bool:
    """Whether ``trial``, new (not enqueued, not a retry), came past the budget: the trials
    numbered before it already use all of it. Numbers are assigned by the storage, so workers
    that ask at the same moment agree on who came last."""
    if not private.is_new(trial):
        return False
    before = [t for t in trials if t.number < trial.number and OVER_BUDGET_ATTR not in t.user_attrs]
    used = sum(t.state.name in _COUNTED for t in before)
    used += sum(t.state == TrialState.FAIL and failed_with_attr in t.user_attrs for t in before)
    return used >= n_trials


def access(
    storage: optuna.storages.BaseStorage,
    *,
    max_retry: int = 3,
    log: Callable[[str], None] | None = None,
) -> StudyAccess:
    """The access of ``storage``: direct on a database, else through the proxy; ``log`` takes
    what the access must say (a lock taken over from a stalled holder)."""
    if private.is_rdb(storage):
        return DirectAccess(storage, log)
    return ProxyAccess(storage, max_retry=max_retry)
