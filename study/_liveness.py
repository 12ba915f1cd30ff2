"""Keeping trials alive and noticing dead ones: heartbeats, claimed-but-never-started trials,
and stop signals."""

from __future__ import annotations

import contextlib
import datetime
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType, TracebackType

import optuna
import sqlalchemy
from optuna.trial import TrialState

from tauopt.storage import root_message


class WorkerStopped(BaseException):
    """SIGTERM or SIGINT reached a worker. A BaseException, so that no ``except Exception``
    in the training code takes it for a failure of the trial."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn the first SIGTERM or SIGINT into :class:`WorkerStopped` in the main thread; a
    second one acts as it did before (so a second Ctrl-C still stops at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum: int, frame: FrameType | None) -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)
        raise WorkerStopped(signal.Signals(signum).name)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Heartbeat:
    """Record the heartbeat of every trial of ``trial_ids`` each interval while they train
    (ask/tell has none built in).

    A failed heartbeat is logged and tried again at the next interval: the thread never dies
    of a storage error. If the storage stays away past the grace period, another worker fails
    the trial and retries it, and this worker drops its result.
    """

    def __init__(
        self,
        storage: optuna.storages.RDBStorage,
        trial_ids: Sequence[int],
        interval: float,
        log: Callable[[str], None],
    ) -> None:
        self._trial_ids, self._lock = list(trial_ids), threading.Lock()
        self._storage, self._interval, self._log = storage, interval, log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tauopt-heartbeat")

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self._interval):
            with self._lock:
                ids = list(self._trial_ids)
            try:
                for trial_id in ids:
                    self._storage.record_heartbeat(trial_id)
            except Exception as e:
                if not failing:
                    self._log(f"heartbeat failed ({root_message(e)}); trying again every "
                              f"{self._interval:g} s")  # fmt: skip
                failing = True
                continue
            if failing:
                self._log("heartbeat recorded again")
                failing = False

    def discard(self, trial_id: int) -> None:
        """Stop beating for ``trial_id`` (finished while the others go on)."""
        with self._lock:
            if trial_id in self._trial_ids:
                self._trial_ids.remove(trial_id)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()


def _with_heartbeat(storage: optuna.storages.RDBStorage, trial_ids: list[int]) -> set[int]:
    if not trial_ids:
        return set()
    query = sqlalchemy.text(
        "SELECT trial_id FROM trial_heartbeats WHERE trial_id IN :ids"
    ).bindparams(sqlalchemy.bindparam("ids", expanding=True))
    with storage.engine.connect() as conn:
        return {int(row[0]) for row in conn.execute(query, {"ids": trial_ids})}


def _running(
    storage: optuna.storages.RDBStorage, study_id: int
) -> dict[int, tuple[int, datetime.datetime | None]]:
    """Number and start of every running trial of the study, by trial id: one query, where
    reading the study's trials (even through the cache) sorts all of them."""
    query = sqlalchemy.text(
        "SELECT trial_id, number, datetime_start FROM trials "
        "WHERE study_id = :s AND state = 'RUNNING'"
    )
    with storage.engine.connect() as conn:
        rows = conn.execute(query, {"s": study_id}).all()
    return {int(i): (int(n), _as_datetime(start)) for i, n, start in rows}


def _as_datetime(value: object) -> datetime.datetime | None:
    # SQLAlchemy's text() hands SQLite's timestamps over as strings.
    if value is None or isinstance(value, datetime.datetime):
        return value
    return datetime.datetime.fromisoformat(str(value))


def fail_stale_trials(study: optuna.Study, grace_seconds: float) -> list[tuple[int, str]]:
    """Fail and queue again every running trial that is dead: its heartbeat has been silent for
    the grace period (Optuna's rule), or it never sent one and started more than the grace
    period ago. Without the second rule a trial whose worker died between claiming it and its
    first heartbeat (or one that something else ``ask()``-ed) would hold its budget forever and
    keep every other worker waiting. Returns (number, why) of the trials failed here."""
    storage = study._storage
    rdb = rdb_of(storage)
    running = _running(rdb, study._study_id)  # (number, start) by id, without the others
    silent = set(rdb._get_stale_trial_ids(study._study_id)) & set(running)
    limit = datetime.datetime.now() - datetime.timedelta(seconds=grace_seconds)
    old = [i for i, (_, start) in running.items() if start is not None and start < limit]
    never = set(old) - silent - _with_heartbeat(rdb, old)
    failed = []
    callback = rdb.get_heartbeat_stale_trial_callback()
    for trial_id in sorted(silent | never):
        try:
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        why = "never sent a heartbeat" if trial_id in never else "its heartbeat went silent"
        failed.append((running[trial_id][0], why))
        if callback is not None:
            callback(study, storage.get_trial(trial_id))
    return failed


def rdb_of(storage: optuna.storages.BaseStorage) -> optuna.storages.RDBStorage:
    # optuna.load_study wraps an RDBStorage in a cache; the heartbeat table is the RDB's.
    backend = getattr(storage, "_backend", storage)
    if not isinstance(backend, optuna.storages.RDBStorage):
        raise TypeError(f"tauopt workers need an RDB storage, got {type(storage).__name__}")
    return backend
