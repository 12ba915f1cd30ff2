"""The proxy's cache shares its reads of running trials between the requests waiting for one,
and still shows every request each write made before it asked. Two proxies' caches on one
PostgreSQL database each see every trial the other makes, takes and finishes; a finished trial,
which each keeps as it read it, takes no write that raced its finish."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from optuna.study import StudyDirection
from optuna.trial import TrialState

from tauopt.storage._optuna import CoalescedCache, set_trial_attrs, stamp_running

STUDY = 1  # the first study of a fresh database


@pytest.fixture()
def slow_reads(tmp_path: Path) -> tuple[CoalescedCache, optuna.storages.RDBStorage, list[int]]:
    """A cache over a SQLite study of 5 running trials whose every database read of trials
    takes 0.3 s; the list counts the reads."""
    rdb = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    study_id = rdb.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "s")
    assert study_id == STUDY
    for _ in range(5):
        rdb.create_new_trial(study_id)
    reads: list[int] = []
    read = rdb._get_trials

    def slow(*args: Any, **kwargs: Any) -> Any:
        reads.append(1)
        time.sleep(0.3)
        return read(*args, **kwargs)

    rdb._get_trials = slow  # type: ignore[method-assign]
    return CoalescedCache(rdb), rdb, reads


def test_waiting_requests_share_one_read(
    slow_reads: tuple[CoalescedCache, optuna.storages.RDBStorage, list[int]],
) -> None:
    cache, _, reads = slow_reads
    seen: list[int] = []
    threads = [
        threading.Thread(target=lambda: seen.append(len(cache.get_all_trials(STUDY))))
        for _ in range(20)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [5] * 20
    # the first read, and one shared by everyone who arrived while it ran (Optuna's cache: 20)
    assert len(reads) <= 3, len(reads)


def test_a_request_sees_what_was_written_before_it_asked(
    slow_reads: tuple[CoalescedCache, optuna.storages.RDBStorage, list[int]],
) -> None:
    """A read already running when a request arrives may miss that request's writes: the
    request must wait for the next one."""
    cache, rdb, reads = slow_reads
    early = threading.Thread(target=lambda: cache.get_all_trials(STUDY))
    early.start()
    while not reads:  # the early read is running
        time.sleep(0.01)
    rdb.create_new_trial(STUDY)
    assert len(cache.get_all_trials(STUDY)) == 6
    early.join()


def test_a_failed_read_is_read_again_by_who_waited(
    slow_reads: tuple[CoalescedCache, optuna.storages.RDBStorage, list[int]],
) -> None:
    cache, rdb, _ = slow_reads
    read = rdb._get_trials
    failures = [1]

    def fails_once(*args: Any, **kwargs: Any) -> Any:
        if failures:
            failures.pop()
            time.sleep(0.3)
            raise optuna.exceptions.StorageInternalError("the connection dropped")
        return read(*args, **kwargs)

    rdb._get_trials = fails_once  # type: ignore[method-assign]
    errors: list[BaseException] = []

    def first() -> None:
        try:
            cache.get_all_trials(STUDY)
        except optuna.exceptions.StorageInternalError as e:
            errors.append(e)

    failing = threading.Thread(target=first)
    failing.start()
    time.sleep(0.1)
    assert len(cache.get_all_trials(STUDY)) == 5  # waited for the failed read, then read itself
    failing.join()
    assert len(errors) == 1


def test_a_restarted_proxy_sets_the_parameters_of_a_trial_it_never_saw(tmp_path: Path) -> None:
    """A worker's trial asked through one proxy process gets its parameters through the next
    (Optuna's cache alone raises KeyError: the trial is not in its map)."""
    rdb = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    study_id = CoalescedCache(rdb).create_new_study([optuna.study.StudyDirection.MAXIMIZE], "s")
    trial_id = CoalescedCache(rdb).create_new_trial(study_id)
    restarted = CoalescedCache(rdb)
    x = optuna.distributions.FloatDistribution(0.0, 1.0)
    restarted.set_trial_param(trial_id, "x", 0.25, x)
    restarted.set_trial_param(trial_id, "y", 0.5, x)
    assert rdb.get_trial(trial_id).params == {"x": 0.25, "y": 0.5}
    with pytest.raises(ValueError):  # the database still checks the distribution
        CoalescedCache(rdb).set_trial_param(
            trial_id, "x", 0.0, optuna.distributions.IntDistribution(0, 3)
        )


def _both(*calls: Callable[[], None]) -> None:
    threads = [threading.Thread(target=call) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_two_proxies_caches_on_one_database_each_see_every_trial(
    scratch_database: tuple[str, Callable[[], None]],
) -> None:
    """Trial ids of a study are given under the study's row lock, so each cache's mark (the
    highest finished trial id it read) never passes a trial it has not read."""
    url, _ = scratch_database
    rdb = optuna.storages.RDBStorage(url)
    a, b = CoalescedCache(rdb), CoalescedCache(optuna.storages.RDBStorage(url))
    sid = a.create_new_study([StudyDirection.MAXIMIZE], "s")
    assert b.get_study_id_from_name("s") == sid

    def make(cache: CoalescedCache) -> None:
        for i in range(20):
            tid = cache.create_new_trial(sid)
            if i % 2:
                cache.set_trial_state_values(tid, TrialState.COMPLETE, [float(i)])
            cache.get_all_trials(sid)  # a read between the writes moves the cache's mark

    _both(lambda: make(a), lambda: make(b))
    truth = [(t.number, t.state, t.values) for t in rdb.get_all_trials(sid)]
    for cache in (a, b):
        assert [(t.number, t.state, t.values) for t in cache.get_all_trials(sid)] == truth
    assert [number for number, _, _ in truth] == list(range(40))

    # enqueued through one, taken once and finished through the other
    template = optuna.trial.create_trial(state=TrialState.WAITING)
    waiting = a.create_new_trial(sid, template_trial=template)
    a.get_all_trials(sid)
    assert b.set_trial_state_values(waiting, TrialState.RUNNING)
    assert not a.set_trial_state_values(waiting, TrialState.RUNNING)
    x = optuna.distributions.FloatDistribution(0.0, 1.0)
    b.set_trial_param(waiting, "x", 0.25, x)  # a trial b never read: set in the database
    b.set_trial_state_values(waiting, TrialState.COMPLETE, [1.0])
    seen = {t._trial_id: t for t in a.get_all_trials(sid)}[waiting]
    assert (seen.state, seen.params, seen.values) == (TrialState.COMPLETE, {"x": 0.25}, [1.0])


def test_a_write_that_races_a_finish_waits_for_it_and_leaves_the_trial_alone(
    scratch_database: tuple[str, Callable[[], None]],
) -> None:
    """A worker's late record or heartbeat, while another worker fails the trial as dead:
    the write waits for the row that the finish holds, then finds the trial finished (it
    would otherwise land on a finished trial that the caches keep without it)."""
    url, _ = scratch_database
    rdb = optuna.storages.RDBStorage(url)
    sid = rdb.create_new_study([StudyDirection.MAXIMIZE], "s")
    tid = rdb.create_new_trial(sid)
    outcome: list[str] = []

    def record() -> None:
        try:
            set_trial_attrs(rdb, tid, user={"late": 1})
            outcome.append("written")
        except optuna.exceptions.UpdateFinishedTrialError:
            outcome.append("refused")

    def beat() -> None:
        stamp_running(rdb, [tid], "beat")
        outcome.append("stamped")

    engine = sqlalchemy.create_engine(url)
    with engine.connect() as conn, conn.begin():
        # the row as Optuna's set_trial_state_values holds it while it finishes the trial
        lock = "SELECT state FROM trials WHERE trial_id = :t FOR UPDATE"
        conn.execute(sqlalchemy.text(lock), {"t": tid})
        threads = [threading.Thread(target=call) for call in (record, beat)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        assert outcome == []  # both wait for the row
        fail = "UPDATE trials SET state = 'FAIL', datetime_complete = now() WHERE trial_id = :t"
        conn.execute(sqlalchemy.text(fail), {"t": tid})
    for t in threads:
        t.join()
    engine.dispose()
    assert sorted(outcome) == ["refused", "stamped"]
    trial = rdb.get_trial(tid)
    assert "late" not in trial.user_attrs and "beat" not in trial.system_attrs


def _seen(trials: list[optuna.trial.FrozenTrial]) -> list[tuple[Any, ...]]:
    """What a reader of the cache sees of the trials, but heartbeat stamps."""
    return [
        (t.number, t.state, t.params, t.user_attrs, t.intermediate_values, t.values) for t in trials
    ]


def test_a_read_fetches_the_changed_trials_and_sees_what_the_database_holds(
    tmp_path: Path,
) -> None:
    """Each step writes as workers do (a parameter, a user attribute, a longer value, an
    intermediate value, a heartbeat, a finish, a new trial); after each, the cache's trials
    equal the database's, and only the trials that changed were read whole. A heartbeat
    rewritten in place shows at the next full read."""
    rdb = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'db.sqlite'}")  # for comparing
    sid = rdb.create_new_study([StudyDirection.MAXIMIZE], "s")
    ids = [rdb.create_new_trial(sid) for _ in range(6)]
    read = rdb._get_trials
    wholes: list[int] = []

    def counted(study_id: int, states: Any, included: set[int], after: int) -> Any:
        trials = read(study_id, states, included, after)
        wholes.append(len(trials))
        return trials

    rdb._get_trials = counted  # type: ignore[method-assign]
    cache = CoalescedCache(rdb)
    cache.FULL_READ_SECONDS = 3600.0
    assert _seen(cache.get_all_trials(sid)) == _seen(db.get_all_trials(sid))
    dist = optuna.distributions.FloatDistribution(0.0, 1.0)
    steps = [
        lambda: rdb.set_trial_param(ids[0], "x", 0.25, dist),
        lambda: rdb.set_trial_user_attr(ids[1], "rung_2", [0.5, 10]),
        lambda: rdb.set_trial_user_attr(ids[1], "rung_2", [0.5, 1000]),
        lambda: rdb.set_trial_intermediate_value(ids[2], 3, 0.7),
        lambda: stamp_running(rdb, ids, "tauopt:heartbeat"),  # a new key: each trial changed
        lambda: stamp_running(rdb, ids, "tauopt:heartbeat"),  # in place: none changed
        lambda: rdb.set_trial_state_values(ids[4], TrialState.COMPLETE, [0.9]),
        lambda: ids.append(rdb.create_new_trial(sid)),
        lambda: None,
    ]
    for step in steps:
        step()
        assert _seen(cache.get_all_trials(sid)) == _seen(db.get_all_trials(sid))
    assert wholes == [6, 1, 1, 1, 1, 6, 0, 1, 1, 0]
    beats = {t._trial_id: t.system_attrs.get("tauopt:heartbeat") for t in db.get_all_trials(sid)}
    cached = {
        t._trial_id: t.system_attrs.get("tauopt:heartbeat") for t in cache.get_all_trials(sid)
    }
    assert cached != {tid: beats[tid] for tid in cached}  # the in-place stamp not read yet
    cache.FULL_READ_SECONDS = 0.0
    cached = {
        t._trial_id: t.system_attrs.get("tauopt:heartbeat") for t in cache.get_all_trials(sid)
    }
    assert cached == {tid: beats.get(tid) for tid in cached}


def test_a_study_that_is_gone_is_missing_from_the_cache_too(tmp_path: Path) -> None:
    rdb = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    sid = rdb.create_new_study([StudyDirection.MAXIMIZE], "s")
    rdb.create_new_trial(sid)
    cache = CoalescedCache(rdb)
    cache.FULL_READ_SECONDS = 3600.0
    assert len(cache.get_all_trials(sid)) == 1
    rdb.delete_study(sid)
    with pytest.raises(KeyError):
        cache.get_all_trials(sid)
