"""Many callers' small writes in one statement, and a question's answer shared for a moment.

* :class:`GroupCommit`: the proxy stamps heartbeats in rounds. A caller's items go into the
  first round that starts after it arrived; one caller runs each round for everybody waiting,
  and each returns (or raises the round's error) once its own round is written: a heartbeat is
  still in the database when its call returns, but 500 workers beating every few seconds are
  one statement per round, not one per call.
* :class:`Recent`: an answer reused while it is younger than a given age (the dead trials: a
  trial is dead only after a grace period of tens of seconds, and every claim asks).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T", bound=Hashable)
A = TypeVar("A")
#: Errors of this many of the latest rounds are kept for their callers.
_KEPT = 64


class GroupCommit(Generic[T]):
    """``write(items)`` for the items of every caller that waits, one round at a time."""

    def __init__(self, write: Callable[[list[T]], None]) -> None:
        self._write = write
        self._turn = threading.Condition()
        self._pending: set[T] = set()
        self._started = 0  # rounds started
        self._done = 0  # rounds finished
        self._busy = False
        self._errors: dict[int, BaseException] = {}
        self.rounds = 0  # rounds written, for the proxy's statistics

    def add(self, items: Iterable[T]) -> None:
        """Write ``items`` with the next round; return once it is written."""
        with self._turn:
            self._pending.update(items)
            mine = self._started + 1  # a round under way took its items already
            while self._done < mine:
                if self._busy:
                    self._turn.wait()
                    continue
                self._run_round()
            error = self._errors.get(mine)
        if error is not None:
            raise error

    def _run_round(self) -> None:
        # called holding the condition; writes without it, so that others join the next round
        self._busy, self._started = True, self._started + 1
        batch, self._pending = list(self._pending), set()
        error: BaseException | None = None
        self._turn.release()
        try:
            self._write(batch)
        except BaseException as e:  # every caller of the round gets it
            error = e
        finally:
            self._turn.acquire()
        self._busy, self._done = False, self._started
        self.rounds += 1
        if error is not None:
            self._errors[self._done] = error
            self._errors.pop(self._done - _KEPT, None)
        self._turn.notify_all()


class Recent(Generic[A]):
    """Answers by key, each reused while younger than the age its caller allows."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._answers: dict[Hashable, tuple[float, A]] = {}

    def get(self, key: Hashable, max_age: float, ask: Callable[[], A]) -> A:
        """The answer for ``key`` asked at most ``max_age`` seconds ago, else ``ask()``'s."""
        now = self._clock()
        with self._lock:
            hit = self._answers.get(key)
        if hit is not None and now - hit[0] <= max_age:
            return hit[1]
        answer = ask()
        with self._lock:
            self._answers[key] = (now, answer)
        return answer

    def forget(self) -> None:
        """Ask afresh next time (something that changes the answers was written)."""
        with self._lock:
            self._answers.clear()
