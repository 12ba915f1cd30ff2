"""Claims that a storage failure interrupts: a trial asked before the failure stays this
worker's claim. (Asked again instead, the first one would run on in the database, beating
from this worker's heartbeat with nobody training it, and every worker would wait for it.)"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

from tauopt.storage import RetryPolicy, StorageSettings, access, open_storage, trial_id
from tauopt.study import create_study, parse_config
from tauopt.study._ledger import Ledger
from tauopt.study._liveness import Heartbeat

LOST = "server closed the connection unexpectedly"


class _Fixture:
    def __init__(self, tmp_path: Path, n_trials: int, anchors: int = 0) -> None:
        settings = StorageSettings(url=f"sqlite:///{tmp_path / 'study.db'}")
        study = {"n_trials": n_trials, "anchors": anchors}
        create_study(settings, "s", parse_config({"study": study}))
        self.storage = open_storage(settings, create_schema=False)
        self.study = optuna.load_study(study_name="s", storage=self.storage)
        self.access = access(self.storage)
        self.said: list[str] = []
        self.heartbeat = Heartbeat(self.access, 60.0, self.said.append)
        self.ledger = Ledger(
            self.study,
            self.storage,
            grace=60.0,
            retry=RetryPolicy(limit=5.0, first_wait=0.01, max_wait=0.01),
            heartbeat=self.heartbeat,
            say=self.said.append,
            access=self.access,
        )

    def fail_budget_check(self, calls: set[int], before: Callable[[int], None] = id) -> None:
        """The budget check's connection is lost on the given calls (1 is the first), after
        ``before(trial_id)`` ran."""
        check, seen = self.access.past_budget, [0]

        def lossy(study_id: int, tid: int, n_trials: int, **kwargs: Any) -> bool:
            seen[0] += 1
            if seen[0] in calls:
                before(tid)
                raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception(LOST))
            return check(study_id, tid, n_trials, **kwargs)

        self.access.past_budget = lossy  # type: ignore[method-assign]

    def states(self) -> list[TrialState]:
        return [t.state for t in self.study.get_trials(deepcopy=False)]


@pytest.fixture
def fixture(tmp_path: Path) -> Iterator[_Fixture]:
    made = _Fixture(tmp_path, n_trials=4)
    yield made
    made.storage.engine.dispose()


@pytest.mark.parametrize("anchors", [0, 3], ids=["new", "enqueued"])
def test_a_trial_asked_before_a_lost_connection_is_claimed_not_asked_again(
    tmp_path: Path, anchors: int
) -> None:
    """A new trial, or a waiting one (an anchor) that ``ask()`` took."""
    made = _Fixture(tmp_path, n_trials=4, anchors=anchors)
    made.fail_budget_check({1})
    claims, _ = made.ledger.claim(1)
    assert [c.trial.number for c in claims] == [0]
    # no second trial asked, or taken from the waiting ones
    waiting = [TrialState.WAITING] * max(anchors - 1, 0)
    assert made.states() == [TrialState.RUNNING, *waiting]
    assert made.ledger.held() == [claims[0].trial]
    assert any(LOST in line and "claiming trials" in line for line in made.said)
    made.storage.engine.dispose()


def test_trials_claimed_before_a_lost_connection_stay_claimed(fixture: _Fixture) -> None:
    fixture.fail_budget_check({2})
    claims, running = fixture.ledger.claim(3)
    assert [c.trial.number for c in claims] == [0, 1, 2] and running
    assert [c.place for c in claims] == [1, 2, 3]
    assert fixture.states() == [TrialState.RUNNING] * 3
    assert sorted(trial_id(t) for t in fixture.ledger.held()) == sorted(
        trial_id(c.trial) for c in claims
    )


def test_a_trial_failed_by_the_lost_attempt_is_let_go(fixture: _Fixture) -> None:
    """The lost attempt had failed its trial (its answer lost with the connection): the retry
    lets it go and claims a new one."""

    def failed_first(tid: int) -> None:
        fixture.storage.set_trial_state_values(tid, state=TrialState.FAIL)

    fixture.fail_budget_check({1}, before=failed_first)
    claims, _ = fixture.ledger.claim(1)
    assert [c.trial.number for c in claims] == [1]
    assert fixture.states() == [TrialState.FAIL, TrialState.RUNNING]
    assert fixture.ledger.held() == [claims[0].trial]


def test_the_budget_still_holds_after_a_lost_connection(fixture: _Fixture) -> None:
    fixture.fail_budget_check({2, 4})
    claims, _ = fixture.ledger.claim(10)
    assert [c.trial.number for c in claims] == [0, 1, 2, 3]
    assert fixture.ledger.claim(1) == ([], True)  # all four run: nothing left to claim
    assert fixture.states() == [TrialState.RUNNING] * 4


def test_a_failure_booked_on_a_trial_failed_elsewhere_is_not_stored(fixture: _Fixture) -> None:
    """A stalled worker books its trial's own failure after another worker failed the trial as
    dead (and queued it again): the reason is not written (it would count the trial against
    the budget beside its rerun), and it goes through the locked write of the metrics."""
    from tauopt.study._ledger import FinishedElsewhereError

    (claim,), _ = fixture.ledger.claim(1)
    written: list[dict[str, Any]] = []
    locked = fixture.access.set_trial_attrs

    def recorded(tid: int, *, user: dict[str, Any], system: dict[str, Any]) -> None:
        written.append(user)
        locked(tid, user=user, system=system)

    fixture.access.set_trial_attrs = recorded  # type: ignore[method-assign]
    fixture.storage.set_trial_state_values(trial_id(claim.trial), state=TrialState.FAIL)
    with pytest.raises(FinishedElsewhereError):
        fixture.ledger.fail(claim.trial, "diverged")
    assert written == [{"fail_reason": "diverged"}]
    assert "fail_reason" not in fixture.study.get_trials(deepcopy=False)[0].user_attrs


def test_a_waiting_trial_another_worker_took_first_makes_no_new_trial(tmp_path: Path) -> None:
    """The budget spent but for one waiting trial (a rerun), which another worker takes
    between this claim's look at the queue and its take: the claim ends with nothing, and no
    new trial is made (``ask()`` would make one, to fail it past the budget)."""
    made = _Fixture(tmp_path, n_trials=3, anchors=3)
    first, _ = made.ledger.claim(2)
    assert [c.trial.number for c in first] == [0, 1]
    waiting = made.access.waiting

    def raced(study_id: int) -> list[int]:
        ids = waiting(study_id)
        for tid in ids:  # another worker takes them
            made.storage.set_trial_state_values(tid, state=TrialState.RUNNING)
        return ids

    made.access.waiting = raced  # type: ignore[method-assign]
    claims, running = made.ledger.claim(1)
    assert claims == [] and running
    assert made.states() == [TrialState.RUNNING] * 3  # no fourth trial, failed or not


def test_a_claim_takes_the_waiting_trials_first_then_new_ones(tmp_path: Path) -> None:
    made = _Fixture(tmp_path, n_trials=5, anchors=2)
    claims, _ = made.ledger.claim(4)
    assert [c.trial.number for c in claims] == [0, 1, 2, 3]
    trials = made.study.get_trials(deepcopy=False)
    assert ["anchor" in t.user_attrs for t in trials] == [True, True, False, False]
    assert made.states() == [TrialState.RUNNING] * 4
