"""The front's quality over wall-clock time: the hypervolume of the feasible front (validation
accuracy against the share of the reference network's parameters left) as trials finish.

Runners on the default study's search space and trial size (``configs/study.toml``), one
after another for every sampler seed, their order rotating; the baseline for
``--baseline-seconds`` of wall time (T_b), every tauopt runner for ``--seconds``:

* ``baseline``: ``optuna.create_study(...).optimize(objective)`` with the authors' style of
  loop and their layer pruning (see ``benchmarks/trials_per_hour.py``);
* ``K=1``, ``K=16``: ``tauopt run`` with ``--batch-trials K``;
* ``dominated``: K = 1 with ``stop_trials = "dominated"``;
* ``bf16``: K = 16 with ``--precision bfloat16``;
* ``K=16+dominated``: K = 16 with ``stop_trials = "dominated"``;
* ``all``: K = 16, ``stop_trials = "dominated"`` and ``--precision bfloat16``;
* ``K=1+anchors``, ``dominated+anchors``: K = 1 (without and with dominated stopping) in a
  study whose first trials are its anchors (``study.anchors``, see ``tauopt.study._anchors``);
  ``K=16+16 anchors``: K = 16 in a study with 16 anchors, so that its first population is
  16 networks bound for one block; every other tauopt runner has ``anchors = 0``, every
  trial drawn by the sampler;
* ``baseline+anchors``: the baseline with the same anchors enqueued first.

The targets compare the tauopt runners with the baseline at T_b: the time each first reaches
the baseline's final hypervolume (T_b / 20 or less is the goal), and trials per hour.

Reference point: validation accuracy 0.5 (the study's ``min_val_accuracy``) and the whole
unpruned reference network (130,006 parameters); the hypervolume is the area the front
dominates in (accuracy - 0.5) x (1 - parameters / 130,006), at most 0.5.

    python benchmarks/front_per_hour.py --data-dir ../shared/data --baseline-seconds 600 \\
        --seconds 180 --seeds 3 [--runners baseline K=1 ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from _machine import JSON_HELP, machine, result_path  # noqa: E402
from trials_per_hour import baseline  # noqa: E402

from tauopt.study import load_config  # noqa: E402
from tauopt.study._anchors import anchor_params  # noqa: E402

REFERENCE_PARAMS = 130_006
FLOOR = 0.5
ANCHORS = 3
#: runner -> (batch trials, stop_trials, precision, anchors); the baselines are not tauopt runs
LEVERS: dict[str, tuple[int, str, str, int]] = {
    "K=1": (1, "off", "float32", 0),
    "K=16": (16, "off", "float32", 0),
    "dominated": (1, "dominated", "float32", 0),
    "bf16": (16, "off", "bfloat16", 0),
    "K=16+dominated": (16, "dominated", "float32", 0),
    "all": (16, "dominated", "bfloat16", 0),
    "K=1+anchors": (1, "off", "float32", ANCHORS),
    "dominated+anchors": (1, "dominated", "float32", ANCHORS),
    "K=16+16 anchors": (16, "off", "float32", 16),
}
BASELINES = {"baseline": 0, "baseline+anchors": ANCHORS}
RUNNERS = (*BASELINES, *LEVERS)


def hypervolume(points: list[tuple[float, float]]) -> float:
    """Area dominated by (accuracy, parameters) points above the reference point."""
    kept = sorted(
        (acc - FLOOR, 1.0 - params / REFERENCE_PARAMS)
        for acc, params in points
        if acc > FLOOR and params < REFERENCE_PARAMS
    )
    area, best_saving = 0.0, 0.0
    for acc, saving in reversed(kept):  # from the most accurate down
        if saving > best_saving:
            area += acc * (saving - best_saving)
            best_saving = saving
    return area


def curve(finished: list[tuple[float, float, float]]) -> list[tuple[float, float]]:
    """(seconds, hypervolume so far) at every finished trial, from (seconds, acc, params)."""
    out, points = [], []
    for seconds, acc, params in sorted(finished):
        points.append((acc, params))
        out.append((round(seconds, 1), round(hypervolume(points), 5)))
    return out


def run_tauopt(
    levers: tuple[int, str, str, int], seed: int, seconds: float, data_dir: Path
) -> dict[str, Any]:
    k, stop, precision, anchors = levers
    with tempfile.TemporaryDirectory() as tmp:
        config = (REPO / "configs" / "study.toml").read_text()
        study = f'[study]\nstop_trials = "{stop}"\nanchors = {anchors}'
        config = config.replace("[study]", study, 1)
        (Path(tmp) / "study.toml").write_text(config)
        url = f"sqlite:///{tmp}/study.db"
        argv = [
            sys.executable,
            "-m",
            "tauopt",
            "run",
            "--storage",
            url,
            "--config",
            f"{tmp}/study.toml",
            "--n-trials",
            "100000",
            "--artifact-dir",
            f"{tmp}/a",
            "--data-dir",
            str(data_dir),
            "--device",
            "cpu",
            "--quiet",
            "--threads",
            str(os.cpu_count() or 1),
            "--batch-trials",
            str(k),
            "--precision",
            precision,
            "--sampler-seed",
            str(seed),
        ]
        start = time.time()
        proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        wall = time.time() - start
        trials = optuna.load_study(study_name="tauopt", storage=url).get_trials()
    # Trials that ended their work: a SIGTERM at the end hands the running ones back (FAIL,
    # queued again), and they are not counted.
    ended = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = [t for t in trials if t.state in ended and t.datetime_complete]
    finished = [
        (t.datetime_complete.timestamp() - start, t.values[0], t.values[1])
        for t in done
        if t.state == optuna.trial.TrialState.COMPLETE and t.values
    ]
    return {"trials": len(done), "finished": finished, "wall": wall}


def run_baseline(seed: int, seconds: float, data_dir: Path, anchors: int) -> dict[str, Any]:
    config = load_config(REPO / "configs" / "study.toml")
    fixed = anchor_params(dataclasses.replace(config, anchors=anchors)) if anchors else None
    start = time.time()
    run = baseline(
        100_000,
        data_dir,
        os.cpu_count() or 1,
        fixed,
        timeout=seconds,
        seed=seed,
        keep_study=True,
    )
    study: optuna.Study = run["study"]
    finished = [
        (t.datetime_complete.timestamp() - start, t.values[0], t.values[1])
        for t in study.trials
        if t.state == optuna.trial.TrialState.COMPLETE and t.datetime_complete and t.values
    ]
    # optimize() ends a trial it started before the timeout: the wall time can exceed it.
    # Enqueued anchors it never started stay WAITING and are not counted.
    ran = [t for t in study.trials if t.state.is_finished()]
    return {"trials": len(ran), "finished": finished, "wall": run["seconds"]}


def first_reached(points: list[tuple[float, float]], target: float) -> float | None:
    """Seconds at which a curve first reaches ``target`` (None: never)."""
    return next((t for t, hv in points if hv >= target and hv > 0), None)


def at(points: list[tuple[float, float]], seconds: float) -> float:
    """A curve's hypervolume at ``seconds``."""
    return max((hv for t, hv in points if t <= seconds), default=0.0)


def summary(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per seed and runner: when it reached the baseline's final hypervolume, its own at
    T_b / 20 (the goal's time), and its trials per hour against the baseline's."""
    rows = []
    for base in (r for r in results if r["runner"] == "baseline"):
        for run in (r for r in results if r["seed"] == base["seed"] and r is not base):
            rows.append(
                {
                    "seed": base["seed"],
                    "runner": run["runner"],
                    "baseline_hypervolume": base["hypervolume"],
                    "reached_at": first_reached(run["curve"], base["hypervolume"]),
                    "hypervolume_at_goal": at(run["curve"], base["seconds"] / 20),
                    "trials_per_hour_ratio": round(
                        run["trials_per_hour"] / max(base["trials_per_hour"], 1e-9), 2
                    ),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--seconds", type=float, default=180, help="per tauopt runner")
    parser.add_argument("--baseline-seconds", type=float, default=600, help="T_b")
    parser.add_argument(
        "--anchored-baseline-seconds", type=float, default=180, help="for baseline+anchors"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds from this one on")
    parser.add_argument("--runners", nargs="+", choices=RUNNERS, default=list(RUNNERS))
    parser.add_argument("--json", type=Path, help=JSON_HELP)
    args = parser.parse_args()
    args.json = args.json or result_path(__file__)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    results: list[dict[str, Any]] = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        shift = seed % len(args.runners)
        for name in args.runners[shift:] + args.runners[:shift]:
            if name in BASELINES:
                anchored = BASELINES[name] > 0
                seconds = args.anchored_baseline_seconds if anchored else args.baseline_seconds
                run = run_baseline(seed, seconds, args.data_dir, BASELINES[name])
            else:
                seconds = args.seconds
                run = run_tauopt(LEVERS[name], seed, seconds, args.data_dir)
            points = curve(run["finished"])
            results.append(
                {
                    "runner": name,
                    "seed": seed,
                    "trials": run["trials"],
                    "seconds": seconds,
                    "wall_seconds": round(run["wall"], 1),
                    "trials_per_hour": round(run["trials"] / run["wall"] * 3600, 1),
                    "hypervolume": points[-1][1] if points else 0.0,
                    "curve": points,
                    # every finished trial: (seconds, validation accuracy, parameters left)
                    "trials_finished": [
                        [round(t, 1), acc, params] for t, acc, params in sorted(run["finished"])
                    ],
                }
            )
            shown = {k: v for k, v in results[-1].items() if k not in ("curve", "trials_finished")}
            print(json.dumps(shown), flush=True)
            # after every run: a run cut short keeps what it measured
            _write(args, results, [])
    rows = summary(results)
    _write(args, results, rows)


def _write(args: argparse.Namespace, results: list[dict[str, Any]], rows: list[Any]) -> None:
    out = {
        **machine(),
        "seconds": args.seconds,
        "baseline_seconds": args.baseline_seconds,
        "anchored_baseline_seconds": args.anchored_baseline_seconds,
        "runs": results,
        "summary": rows,
    }
    args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
