"""The proxy's cache shares its reads of running trials between the requests waiting for one,
and still shows every request each write made before it asked."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import optuna
import pytest

from tauopt.storage._optuna import CoalescedCache

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
