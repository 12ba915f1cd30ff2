"""How many workers one ``tauopt proxy`` serves: the capacity table of docs/deployment.md,
computed from measured per-trial costs (``many_workers.py`` results with the proxy's own
count of its calls, ``proxy_calls_per_trial``).

The proxy's CPU per trial is modelled from the measurement as three parts:

* the heartbeats: one call per ``--heartbeat`` seconds of a trial, each as measured;
* the sampler's read of the study (``RecentTrials``, and Optuna's ``GetTrials`` before it or
  where the proxy offers no such call): every unfinished trial of the study is sent at each
  claim, so it grows with the trials running, that is with the workers (linear, scaled from
  the measured N);
* everything else (claim, parameters, record, booking): as measured, whatever the length;

and the process's CPU beyond its calls' threads (gRPC's own) in the measured proportion. For
trial length T and N workers, the proxy needs N * cost(T, N) / T of a core.

    python benchmarks/proxy_capacity.py \\
        benchmarks/results/many_workers_cpu_2026-12-07_proxy_service-on_n500_60s.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

LENGTHS = {"10 s": 10.0, "60 s": 60.0, "10 min": 600.0}
#: The share of a core a proxy is run at: above it, claims queue behind one another.
SAFE_LOAD = 0.5


def model(result: dict[str, Any]) -> dict[str, float]:
    """Per trial, in seconds of the proxy's CPU: ``beat`` (one heartbeat), ``read_per_worker``
    (the sampler's read, per worker running), ``fixed``; and ``overhead`` (process / calls)."""
    calls = result["proxy_calls_per_trial"]
    beat = calls["Beat"]["cpu_ms"] / calls["Beat"]["calls"] / 1000
    read = (
        sum(calls.get(m, {"cpu_ms": 0.0})["cpu_ms"] for m in ("GetTrials", "RecentTrials")) / 1000
    )
    total = sum(m["cpu_ms"] for m in calls.values()) / 1000
    fixed = total - read - calls["Beat"]["cpu_ms"] / 1000
    return {
        "beat": beat,
        "read_per_worker": read / result["workers"],
        "fixed": fixed,
        "overhead": result["cpu_seconds"]["proxy_per_trial"] / total,
    }


def cost(m: dict[str, float], seconds: float, workers: float, heartbeat: float) -> float:
    """The proxy's CPU seconds per trial of ``seconds`` with ``workers`` running."""
    beats = seconds / heartbeat + 1  # the claim's first, then one per interval
    return m["overhead"] * (m["fixed"] + m["read_per_worker"] * workers + beats * m["beat"])


def workers_per_core(m: dict[str, float], seconds: float, heartbeat: float, load: float) -> int:
    """The workers whose trials keep ``load`` of one core busy: N * cost(N) / T = load, a
    quadratic in N (the read grows with N)."""
    a = m["overhead"] * m["read_per_worker"]
    b = m["overhead"] * (m["fixed"] + (seconds / heartbeat + 1) * m["beat"])
    c = -load * seconds
    return int((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)) if a > 0 else int(-c / b)


def table(m: dict[str, float], heartbeat: float) -> str:
    rows = [
        "| trial length | workers per proxy core (at half a core / a whole core) "
        "| proxy CPU per trial at 500 workers | cores for 1,000 workers |",
        "|---|---|---|---|",
    ]
    for name, seconds in LENGTHS.items():
        half = workers_per_core(m, seconds, heartbeat, SAFE_LOAD)
        full = workers_per_core(m, seconds, heartbeat, 1.0)
        per_trial = cost(m, seconds, 500, heartbeat)
        thousand = 1000 * cost(m, seconds, 1000, heartbeat) / seconds
        rows.append(
            f"| {name} | {half:,} / {full:,} | {1000 * per_trial:.0f} ms | {thousand:.2f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="a many_workers.py result through the proxy")
    parser.add_argument(
        "--heartbeat", type=float, default=10.0, help="the workers' heartbeat interval (s)"
    )
    args = parser.parse_args()
    result = json.loads(args.result.read_text())
    if not result.get("proxy_calls_per_trial"):
        parser.error(f"{args.result} has no proxy_calls_per_trial: run many_workers.py --via proxy")
    m = model(result)
    print(
        f"measured: {result['workers']} workers, {result['trial_seconds']:g}-s trials, "
        f"{result['date']}, {result['cpu']} ({result['cores']} cores), commit {result['commit']}"
    )
    print(
        f"per trial: {1000 * m['fixed']:.1f} ms fixed, {1000 * m['beat']:.2f} ms per heartbeat, "
        f"{1000 * m['read_per_worker']:.3f} ms of the sampler's read per worker running; "
        f"the process {m['overhead']:.2f}x its calls"
    )
    print(f"heartbeat every {args.heartbeat:g} s\n")
    print(table(m, args.heartbeat))


if __name__ == "__main__":
    main()
