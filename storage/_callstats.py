"""What the proxy's calls cost, per method: how many, the CPU time of the threads that served
them, and their time from arrival to answer. The proxy's guard records every call; ``tauopt
proxy --stats S`` logs a line every S seconds, and tauopt's service answers ``Stats`` with the
totals so far (``benchmarks/many_workers.py`` reads them).

The CPU time is that of the Python thread that served the call (the database's answer
included, as the driver runs in that thread). gRPC's own threads (the network, decoding the
request) are not in it: the process's CPU time less the calls' sum is that share.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class MethodStats:
    calls: int = 0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0

    def minus(self, before: MethodStats | None) -> MethodStats:
        if before is None:
            return MethodStats(self.calls, self.cpu_seconds, self.wall_seconds)
        return MethodStats(
            self.calls - before.calls,
            self.cpu_seconds - before.cpu_seconds,
            self.wall_seconds - before.wall_seconds,
        )


class CallStats:
    """The totals per method since the proxy started; safe from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by: dict[str, MethodStats] = {}
        self.started = time.monotonic()

    def add(self, method: str, cpu_seconds: float, wall_seconds: float) -> None:
        with self._lock:
            entry = self._by.setdefault(method, MethodStats())
            entry.calls += 1
            entry.cpu_seconds += cpu_seconds
            entry.wall_seconds += wall_seconds

    def snapshot(self) -> dict[str, MethodStats]:
        with self._lock:
            return {
                m: MethodStats(s.calls, s.cpu_seconds, s.wall_seconds) for m, s in self._by.items()
            }

    def as_json(self) -> dict[str, dict[str, float]]:
        return {
            method: {"calls": s.calls, "cpu_seconds": s.cpu_seconds, "wall_seconds": s.wall_seconds}
            for method, s in sorted(self.snapshot().items())
        }


def summary(
    now: dict[str, MethodStats], before: dict[str, MethodStats], seconds: float, top: int = 4
) -> str:
    """One log line for the calls between two snapshots ``seconds`` apart: their number and
    CPU time (as a share of one core), and the ``top`` methods by CPU time."""
    spent = {m: s.minus(before.get(m)) for m, s in now.items()}
    spent = {m: s for m, s in spent.items() if s.calls}
    calls = sum(s.calls for s in spent.values())
    cpu = sum(s.cpu_seconds for s in spent.values())
    share = 100 * cpu / seconds if seconds > 0 else 0.0
    ranked = sorted(spent.items(), key=lambda kv: -kv[1].cpu_seconds)[:top]
    parts = ", ".join(
        f"{m} {s.calls:,} ({1000 * s.cpu_seconds / s.calls:.1f} ms each)" for m, s in ranked
    )
    head = f"calls in the last {seconds:.0f} s: {calls:,}, {cpu:.1f} s of CPU"
    head += f" ({share:.0f} % of a core)"
    return f"{head}: {parts}" if parts else head


def log_every(
    stats: CallStats, seconds: float, log: Callable[[str], None], stop: threading.Event
) -> threading.Thread:
    """A daemon thread that logs :func:`summary` every ``seconds`` until ``stop`` is set
    (nothing for a quiet interval)."""

    def run() -> None:
        before, then = stats.snapshot(), time.monotonic()
        while not stop.wait(seconds):
            now, at = stats.snapshot(), time.monotonic()
            if sum(s.calls for s in now.values()) > sum(s.calls for s in before.values()):
                log(summary(now, before, at - then))
            before, then = now, at

    thread = threading.Thread(target=run, name="tauopt-proxy-stats", daemon=True)
    thread.start()
    return thread
