"""Keeping trials alive: heartbeats, and stop signals turned into an exception."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType, TracebackType

from tauopt.storage import StudyAccess, root_message


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
    """Record, every ``interval`` seconds, the heartbeat of every trial this worker holds
    (ask/tell has none built in). A worker starts it once and adds each trial the moment it
    claims it, so that no trial of a long claim or a long batch turns stale while it waits.

    A failed heartbeat is logged and tried again at the next interval: the thread never dies
    of a storage error. If the storage stays away past the grace period, another worker fails
    the trial and retries it, and this worker drops its result.
    """

    def __init__(self, access: StudyAccess, interval: float, log: Callable[[str], None]) -> None:
        self._trial_ids: list[int] = []
        self._lock = threading.Lock()
        self._access, self._interval, self._log = access, interval, log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tauopt-heartbeat")

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self._interval):
            with self._lock:
                ids = list(self._trial_ids)
            try:
                if ids:
                    self._access.beat(ids)
            except Exception as e:
                if not failing:
                    self._log(f"heartbeat failed ({root_message(e)}); trying again every "
                              f"{self._interval:g} s")  # fmt: skip
                failing = True
                continue
            if failing:
                self._log("heartbeat recorded again")
                failing = False

    def add(self, trial_ids: Sequence[int]) -> None:
        """Beat for ``trial_ids`` from the next interval on."""
        with self._lock:
            self._trial_ids += [i for i in trial_ids if i not in self._trial_ids]

    def discard(self, trial_id: int) -> None:
        """Stop beating for ``trial_id`` (finished, or handed back)."""
        with self._lock:
            if trial_id in self._trial_ids:
                self._trial_ids.remove(trial_id)

    @property
    def trial_ids(self) -> list[int]:
        with self._lock:
            return list(self._trial_ids)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
