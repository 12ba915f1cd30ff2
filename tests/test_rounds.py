"""The proxy's rounds (``tauopt.storage._rounds``): heartbeats of many callers in one write,
each caller back once its own items are written, a round's error to its callers alone; an
answer shared while young."""

from __future__ import annotations

import threading
import time

import pytest

from tauopt.storage._rounds import GroupCommit, Recent


def test_callers_that_wait_together_share_a_round_and_return_once_written() -> None:
    written: list[list[int]] = []
    gate = threading.Event()

    def write(items: list[int]) -> None:
        if not written:
            gate.wait(5)  # the first round is slow: the others queue behind it
        written.append(sorted(items))

    rounds = GroupCommit(write)
    seen: dict[int, bool] = {}

    def call(i: int) -> None:
        rounds.add([i])
        seen[i] = any(i in batch for batch in written)

    first = threading.Thread(target=call, args=(0,))
    first.start()
    time.sleep(0.2)
    others = [threading.Thread(target=call, args=(i,)) for i in range(1, 9)]
    for t in others:
        t.start()
    time.sleep(0.3)
    gate.set()
    for t in [first, *others]:
        t.join(10)
    assert written == [[0], list(range(1, 9))]  # 9 calls, 2 rounds
    assert seen == {i: True for i in range(9)}  # each back after its items were written
    assert rounds.rounds == 2


def test_a_rounds_error_reaches_its_callers_and_not_the_next_round() -> None:
    calls = 0

    def write(items: list[str]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("database away")

    rounds = GroupCommit(write)
    with pytest.raises(ConnectionError, match="database away"):
        rounds.add(["a"])
    rounds.add(["b"])  # a round of its own, written
    assert calls == 2


def test_an_answer_is_shared_while_young_and_asked_again_after() -> None:
    now = [0.0]
    recent: Recent[int] = Recent(clock=lambda: now[0])
    asked = []

    def ask() -> int:
        asked.append(now[0])
        return len(asked)

    assert recent.get("k", 2.0, ask) == 1
    now[0] = 1.5
    assert recent.get("k", 2.0, ask) == 1
    assert recent.get("other", 2.0, ask) == 2
    now[0] = 2.5
    assert recent.get("k", 2.0, ask) == 3
    recent.forget()
    assert recent.get("k", 2.0, ask) == 4
