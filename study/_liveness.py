"""Keeping trials alive: heartbeats, and stop signals turned into an exception."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import FrameType, TracebackType

from tauopt.storage import StudyAccess, root_message


class WorkerStopped(BaseException):
    """SIGTERM or SIGINT reached a worker. A BaseException, so that no ``except Exception``
    in the training code takes it for a failure of the trial."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


#: Seconds past the grace after which a stop that was asked is made at once, whatever the
#: worker is doing (a save or a booking that hangs on a storage that went away): the trials it
#: still holds are handed back as on any stop, and go on from their latest saved states.
HARD_STOP_MARGIN = 5.0


class StopSignals:
    """The first SIGTERM or SIGINT of a worker. Outside :meth:`deferred` it raises
    :class:`WorkerStopped` at once in the main thread; inside, it is a request: ``stop_in()``
    tells the training how many of the ``grace`` seconds are left, and if the worker has not
    left the deferred part ``grace`` + :data:`HARD_STOP_MARGIN` seconds after the signal, an
    alarm raises :class:`WorkerStopped` there. A second signal acts as it did before the
    worker started (so a second Ctrl-C still stops at once)."""

    def __init__(self, grace: float = 0.0) -> None:
        self.grace = grace
        self.name: str | None = None  # the signal's name, once one came
        self._at = 0.0
        self._deferring = False

    def stop_in(self) -> float | None:
        """Seconds of the grace left since a stop was asked; None while none was."""
        if self.name is None:
            return None
        return max(0.0, self.grace - (time.monotonic() - self._at))

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A part of the work (training, booking) that a stop signal does not break into: it
        is asked to stop instead (see the class)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
            if threading.current_thread() is threading.main_thread():
                signal.setitimer(signal.ITIMER_REAL, 0)

    def _received(self, name: str) -> None:
        self.name, self._at = name, time.monotonic()
        if not self._deferring:
            raise WorkerStopped(name)
        signal.setitimer(signal.ITIMER_REAL, self.grace + HARD_STOP_MARGIN)

    def _alarm(self, signum: int, frame: FrameType | None) -> None:
        if self._deferring and self.name is not None:
            raise WorkerStopped(self.name)


@contextlib.contextmanager
def stop_on_signals(grace: float = 0.0) -> Iterator[StopSignals]:
    """Turn the first SIGTERM or SIGINT into a stop (see :class:`StopSignals`) in the main
    thread; in another thread signals are left alone and nothing ever asks to stop."""
    stops = StopSignals(grace)
    if threading.current_thread() is not threading.main_thread():
        yield stops
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    alarm = signal.getsignal(signal.SIGALRM)

    def handler(signum: int, frame: FrameType | None) -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)
        stops._received(signal.Signals(signum).name)

    for sig in previous:
        signal.signal(sig, handler)
    signal.signal(signal.SIGALRM, stops._alarm)
    try:
        yield stops
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, alarm)
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
