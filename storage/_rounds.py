"""Many callers' small writes in one statement, and a question's answer shared for a moment.

* :class:`GroupCommit`: many callers' items written in rounds. A caller's items go into the
  first round that starts after it arrived; one caller runs each round for everybody waiting,
  and each returns (or raises the round's error) once its own round is written.
* :class:`Answered`: the same, where each caller waits for an answer of its own (the proxy
  places new trials against the budget in rounds: one lock and two queries for a round).
* :class:`Behind`: items written by a thread of its own, once a period, and the caller does
  not wait (the proxy's heartbeats: 500 workers beating every few seconds spread their calls
  evenly, so rounds that callers wait for hold one or two each; a heartbeat written up to a
  second late is far inside the grace period).
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
R = TypeVar("R")
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

    @property
    def rounds(self) -> int:
        """Rounds written (the proxy's statistics)."""
        return self._done

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
        if error is not None:
            self._errors[self._done] = error
            self._errors.pop(self._done - _KEPT, None)
        self._turn.notify_all()


class Answered(Generic[T, R]):
    """A :class:`GroupCommit` whose round answers each item: ``answer(items)`` (a dict with
    every item) for the items of every caller that waits, one round at a time."""

    def __init__(self, answer: Callable[[list[T]], dict[T, R]]) -> None:
        self._answer = answer
        self._answers: dict[T, R] = {}
        self._rounds: GroupCommit[T] = GroupCommit(self._write)

    def _write(self, items: list[T]) -> None:
        self._answers.update(self._answer(items))  # rounds run one at a time

    def ask(self, item: T) -> R:
        """``item``'s answer, from the next round (each caller asks its own items)."""
        self._rounds.add([item])
        return self._answers.pop(item)

    @property
    def rounds(self) -> int:
        return self._rounds.rounds


class Behind(Generic[T]):
    """``write(items)`` every ``every`` seconds for the items added since, by a thread of its
    own; ``add`` returns at once. The items of a failed write wait for the next (a database
    that is away gets them when it is back; ``log`` hears of each failure). ``flush`` writes
    what waits now, for a reader that must see every item added before it asked."""

    def __init__(
        self,
        write: Callable[[list[T]], None],
        every: float,
        log: Callable[[str], None] = lambda line: None,
    ) -> None:
        self._write, self._every, self._log = write, every, log
        self._lock = threading.Lock()  # the pending items and the thread
        self._writing = threading.Lock()  # one write at a time
        self._pending: set[T] = set()
        self._thread: threading.Thread | None = None
        self.rounds = 0  # writes done, for the proxy's statistics

    def add(self, items: Iterable[T]) -> None:
        """Write ``items`` with the next round, within ``every`` seconds."""
        with self._lock:
            self._pending.update(items)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="behind", daemon=True)
                self._thread.start()

    def flush(self) -> None:
        """Write every item added so far, now (raises the write's error)."""
        with self._writing:
            with self._lock:
                batch, self._pending = self._pending, set()
            if not batch:
                return
            try:
                self._write(list(batch))
            except BaseException:
                with self._lock:
                    self._pending |= batch
                raise
            self.rounds += 1

    def _run(self) -> None:
        while True:
            time.sleep(self._every)
            try:
                self.flush()
            except Exception as e:  # kept for the next round; the callers went on already
                self._log(f"could not write {type(e).__name__}: {' '.join(str(e).split())[:200]}")


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
