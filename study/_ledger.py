"""The ledger of a study: which trials are claimed, what the budget allows, and how each
claimed trial is booked (complete, pruned, failed, queued again, or dropped).

The budget is the study's ``n_trials``: every trial counts against it but those failed
through no fault of their own (a dead or stopped worker, a storage or disk failure), which
are queued again and rerun with the same parameters and seed.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import optuna
from optuna.trial import TrialState

from tauopt.errors import StorageError
from tauopt.storage import (
    OVER_BUDGET_ATTR,
    RETRIED_FROM,
    ClaimView,
    RetryPolicy,
    StudyAccess,
    is_storage_error,
    study_id,
    take_waiting,
    trial_id,
)
from tauopt.study._liveness import Heartbeat
from tauopt.study._record import CONFIG_ATTR, FAIL_REASON_ATTR, RETRY_REASON_ATTR, progressed

_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
#: A claim holds the study's lock at most this long, then lets other workers claim: asking
#: slows as running trials pile up, and a claim of hundreds would keep the others waiting.
CLAIM_HOLD_SECONDS = 1.0
#: Where the budget is stored: the study's config, then its keys.
BUDGET_AT = (CONFIG_ATTR, "study", "n_trials")


def budget_used(counts: dict[str, int], failures_with_reason: int) -> int:
    """The trials that use up a study's budget, from its trials per state and the failed ones
    carrying ``FAIL_REASON_ATTR``."""
    return sum(counts.get(state.name, 0) for state in _COUNTED) + failures_with_reason


def finished(counts: dict[str, int], failures_with_reason: int) -> int:
    """The trials that are done and counted: complete, pruned, failed through their own fault."""
    return counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) + failures_with_reason


@dataclass(frozen=True)
class Claim:
    """A trial taken by this worker; ``place`` is roughly its place in the study's budget
    (trials finished before it, plus one), for progress lines."""

    trial: optuna.Trial
    place: int


@dataclass
class _Taken:
    """What one claim took so far, kept across the retries of the claim."""

    claims: list[Claim] = field(default_factory=list)
    #: asked, its place in the budget not yet checked
    unchecked: optuna.Trial | None = None


class FinishedElsewhereError(Exception):
    """The trial was finished by another worker while this one had stalled."""


def fail_stale_trials(
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    access: StudyAccess,
    grace_seconds: float,
) -> list[tuple[int, str]]:
    """Fail and queue again every running trial that is dead: its heartbeat has been silent for
    the grace period, or it never sent one and started more than the grace period ago (its
    worker died between claiming it and its first heartbeat, or something else ``ask()``-ed
    it). Returns (number, why) of the trials failed here."""
    return requeue_dead(study, storage, access, access.dead_trials(study_id(study), grace_seconds))


def requeue_dead(
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    access: StudyAccess,
    dead: Mapping[int, tuple[int, str]],
) -> list[tuple[int, str]]:
    """Fail and queue again the ``dead`` trials (id -> (number, why)) that no other worker
    has finished first; returns (number, why) of those failed here."""
    failed = []
    for tid, (number, why) in sorted(dead.items()):
        if requeue(study, storage, access, tid, None):
            failed.append((number, why))
    return failed


def requeue(
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    access: StudyAccess,
    tid: int,
    reason: str | None,
    *,
    counted: bool | None = None,
) -> bool:
    """Fail trial ``tid`` through no fault of its own and queue it again with the same
    parameters and seed (Optuna's retry callback, as for a dead worker's trial); the reason
    is stored with it. False if another worker finished it first.

    ``counted=False`` (a worker stopped by a signal, which saved the trial's state): the
    retry does not count against the storage's ``max_retry``, which is there for trials that
    kill their workers; a trial on preemptible machines may be stopped any number of times.
    ``None`` (a dead worker's trial): counted unless the attempt saved a state past the one it
    started from (a worker killed after its trial made progress is not the trial's doing)."""
    try:
        if reason is not None:
            storage.set_trial_user_attr(tid, RETRY_REASON_ATTR, reason)
        if not storage.set_trial_state_values(tid, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    failed = storage.get_trial(tid)
    if counted is None:
        counted = not progressed(failed.user_attrs)
    if counted:
        access.retry(study, failed)
        return True
    # Optuna's retry callback without its entry in the retry history (public API only).
    system = {RETRIED_FROM: failed.number, **failed.system_attrs}
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.WAITING,
            params=failed.params,
            distributions=failed.distributions,
            user_attrs=failed.user_attrs,
            system_attrs=system,
        )
    )
    return True


def _view(access: StudyAccess, sid: int, grace: float) -> ClaimView:
    return access.claim_view(sid, grace, failed_with_attr=FAIL_REASON_ATTR, budget_at=BUDGET_AT)


def _made(access: StudyAccess, study: optuna.Study) -> tuple[optuna.Trial | None] | None:
    with warnings.catch_warnings():
        # Trial() warns, as ask() does, that heartbeats are meant for optimize()
        warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
        return access.new_trial(study, failed_with_attr=FAIL_REASON_ATTR, budget_at=BUDGET_AT)


class Ledger:
    """Claims trials of one study for one worker and books what became of them. Every storage
    call goes through ``retry``; ``say`` prints what the worker must not keep quiet."""

    def __init__(
        self,
        study: optuna.Study,
        storage: optuna.storages.BaseStorage,
        *,
        grace: float,
        retry: RetryPolicy,
        heartbeat: Heartbeat,
        say: Callable[[str], None],
        access: StudyAccess,
    ) -> None:
        self.study, self.storage, self.grace, self.access = study, storage, grace, access
        self.retry, self.heartbeat, self.say = retry, heartbeat, say
        self.n_trials = 0
        self._held: dict[int, optuna.Trial] = {}  # claimed and not yet booked, by trial id

    def held(self) -> list[optuna.Trial]:
        """The trials this worker has claimed and not yet booked."""
        return list(self._held.values())

    def db(self, what: str, fn: Callable[[], object]) -> object:
        return self.retry.call(what, fn, self.say)

    def claim(self, k: int) -> tuple[list[Claim], bool]:
        """Up to ``k`` waiting or new trials, as far as the budget allows, and whether any trial
        of the study still runs. Each trial beats from the moment it is claimed."""
        claims: list[Claim] = []
        while len(claims) < k:
            batch, running = self._claim_some(k - len(claims))
            claims += batch
            if not batch or len(claims) >= k:
                return claims, bool(claims) or running
        return claims, True

    def _claim_some(self, k: int) -> tuple[list[Claim], bool]:
        taken = _Taken()

        def take() -> tuple[list[Claim], bool]:
            with self.access.lock(self.study.study_name):
                return self._claim_locked(k, taken)

        return self.retry.call("claiming trials", take, self.say)

    def _claim_locked(self, k: int, taken: _Taken) -> tuple[list[Claim], bool]:
        """Under the study lock: fail dead trials, then take trials while the budget allows,
        for at most :data:`CLAIM_HOLD_SECONDS`. ``taken`` holds what earlier attempts of this
        claim took before a storage call failed: those trials run and beat, and are this
        worker's (asked again, they would beat forever with nobody to run them)."""
        start = time.monotonic()
        sid = study_id(self.study)
        # The dead trials, the budget (`tauopt create --n-trials` may change it while workers
        # run), the counts (in the database, not by reading every trial) and the queue: one
        # answer, asked again once dead trials were queued again.
        view = _view(self.access, sid, self.grace)
        if view.dead:
            for number, why in requeue_dead(self.study, self.storage, self.access, view.dead):
                self.say(f"trial {number} {why} for {self.grace:g} s: failed and queued again")
            view = _view(self.access, sid, self.grace)
        self.n_trials = view.budget
        counts, own = view.counts, view.own_failures
        used, waiting, done = (
            budget_used(counts, own),
            counts.get("WAITING", 0),
            finished(counts, own),
        )
        claims = taken.claims
        if (trial := taken.unchecked) is not None and not self._checked_again(taken, trial, done):
            return claims, True
        # A waiting trial (a retry or a planned run, counted already) is taken before a new
        # one is made. The counts include the trials taken before: they are running.
        queue = list(view.waiting) if waiting else []
        while len(claims) < k and (queue or used < self.n_trials):
            trial = self._take(queue) if queue else None
            if trial is None:
                if used >= self.n_trials:  # others took the waiting ones: nothing is left
                    break
                used += 1
                made = _made(self.access, self.study)
                if made is not None:  # made, beating and checked, in one call
                    if made[0] is None:  # past the budget: failed, and claiming stops
                        break
                    taken.claims.append(
                        Claim(self._hold(made[0], beat=False), done + len(claims) + 1)
                    )
                    if time.monotonic() - start > CLAIM_HOLD_SECONDS:
                        break
                    continue
                trial = self._ask()
            taken.unchecked = trial
            if not self._checked(taken, trial, done):
                break
            if time.monotonic() - start > CLAIM_HOLD_SECONDS:
                break
        return claims, bool(claims) or counts.get("RUNNING", 0) > 0

    def _take(self, queue: list[int]) -> optuna.Trial | None:
        """The first trial of ``queue`` (waiting trial ids) that no other worker took first;
        those tried leave the queue."""
        while queue:
            trial = take_waiting(self.study, queue.pop(0))
            if trial is not None:
                return self._hold(trial)
        return None

    def _checked(self, taken: _Taken, trial: optuna.Trial, done: int) -> bool:
        """Whether ``trial`` (``taken.unchecked``) is within the budget: then it joins the
        claims. Checked under the lock, too: a holder stopped past LOCK_IDLE_SECONDS loses it
        to the server and, when it resumes, must not claim on what it counted before."""
        within = not self._past_budget(trial)
        if within:
            taken.claims.append(Claim(trial, done + len(taken.claims) + 1))
        taken.unchecked = None
        return within

    def _ask(self) -> optuna.Trial:
        with warnings.catch_warnings():
            # ask() warns that heartbeats are meant for optimize(): the worker records them.
            warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
            return self._hold(self.study.ask())

    def _hold(self, trial: optuna.Trial, *, beat: bool = True) -> optuna.Trial:
        """``trial``, just taken, as this worker's: held and beating (``beat=False``: its
        first heartbeat was stamped as it was made)."""
        tid = trial_id(trial)
        self._held[tid] = trial
        self.heartbeat.add([tid])
        if not beat:
            return trial
        # The first heartbeat inside the lock, so no other worker sees this trial running
        # without one. If it fails, the trial is still ours (asking again would leave it
        # orphaned): the heartbeat thread records it within an interval.
        try:
            self.access.beat([tid])
        except Exception as e:
            if not is_storage_error(e):
                raise
        return trial

    def _checked_again(self, taken: _Taken, trial: optuna.Trial, done: int) -> bool:
        """:meth:`_checked` for a trial asked by an attempt that failed before its check was
        through; if the check had failed it already (the answer lost), claiming goes on."""
        if self.storage.get_trial(trial_id(trial)).state != TrialState.RUNNING:
            self._release(trial)
            taken.unchecked = None
            return True
        return self._checked(taken, trial, done)

    def _past_budget(self, trial: optuna.Trial) -> bool:
        """A new trial whose predecessors already use the budget fails itself, using none of
        it, and claiming stops: the budget's guard without a lock (through the proxy), and
        where a lock was lost (see ``tauopt.storage.study_lock``)."""
        sid, tid = study_id(self.study), trial_id(trial)
        # the budget as stored now, not as this claim read it: `create` may have lowered it
        if not self.access.past_budget(
            sid, tid, self.n_trials, failed_with_attr=FAIL_REASON_ATTR, budget_at=BUDGET_AT
        ):
            return False
        try:
            self.storage.set_trial_user_attr(tid, OVER_BUDGET_ATTR, True)
            self.storage.set_trial_state_values(tid, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # failed here by an attempt whose answer was lost with its connection
        self._release(trial)
        return True

    # -- booking -------------------------------------------------------------------------

    def guarded(self, what: str, fn: Callable[[], object]) -> object:
        """A storage call on a running trial: retried, and a trial that another worker has
        finished meanwhile (this worker stalled past the grace period) ends this attempt."""
        try:
            return self.db(what, fn)
        except optuna.exceptions.UpdateFinishedTrialError as e:
            raise FinishedElsewhereError() from e

    def complete(
        self,
        trial: optuna.Trial,
        values: list[float],
        attrs: Mapping[str, object],
        system: Mapping[str, object],
    ) -> None:
        """Store a finished trial's attributes (one transaction) and tell its values."""
        tid = trial_id(trial)
        self.guarded(
            "storing the metrics",
            lambda: self.access.set_trial_attrs(tid, user=dict(attrs), system=dict(system)),
        )
        self.finish(trial, values, TrialState.COMPLETE)

    def fail(self, trial: optuna.Trial, reason: str) -> None:
        """The trial's own failure: it stays failed and uses its budget. The reason is written
        under the trial's row lock (as the metrics are), so that it never lands on a trial
        another worker has failed and queued again meanwhile: that would count it twice."""
        tid = trial_id(trial)
        self.guarded(
            "storing the failure",
            lambda: self.access.set_trial_attrs(tid, user={FAIL_REASON_ATTR: reason}, system={}),
        )
        self.finish(trial, None, TrialState.FAIL)

    def finish(self, trial: optuna.Trial, values: list[float] | None, state: TrialState) -> None:
        """``tell``, retried. If a retry finds the trial finished, it was this worker's own
        earlier attempt that got through (same state) or another worker's (dropped)."""
        try:
            self.db("storing the result", lambda: self.study.tell(trial, values, state=state))
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as e:
            now = self.db("reading the trial", lambda: self.storage.get_trial(trial_id(trial)))
            if getattr(now, "state", None) != state:
                raise FinishedElsewhereError() from e
        finally:
            self._release(trial)

    def _release(self, trial: optuna.Trial) -> None:
        self.heartbeat.discard(trial_id(trial))
        self._held.pop(trial_id(trial), None)

    def hand_back(self, trial: optuna.Trial, reason: str, *, quick: bool = False) -> None:
        """Queue ``trial`` again through no fault of its own. On a stop signal (``quick``) the
        worker does not wait minutes for a database that is away: if this fails, the trial's
        heartbeat goes stale and another worker retries it after the grace period."""
        policy = RetryPolicy(limit=10.0) if quick else self.retry
        tid = trial_id(trial)
        self._release(trial)
        try:
            done = policy.call(
                "queueing the trial again",
                lambda: requeue(
                    self.study, self.storage, self.access, tid, reason, counted=not quick
                ),
                self.say,
            )
        except StorageError as e:
            self.say(f"trial {trial.number} could not be queued again ({e}); it is retried "
                     "once its heartbeat is stale")  # fmt: skip
            return
        if done:
            self.say(f"trial {trial.number} failed and queued again: {reason}")
