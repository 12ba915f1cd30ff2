"""The workers' sampler against Optuna 5's default TPE (multivariate, constant liar).

``WindowedTPESampler`` (``tauopt.storage``) copies ``TPESampler._sample`` to model only the
latest 1,000 finished trials, read through the study's cache. Two questions decide whether the
copy earns its place:

* ``ask``: what a trial's ask, suggestions and tell cost in a SQLite study of the default
  search space prefilled with 1,000 or 10,000 finished trials (as ``storage_overhead.py``
  fills it; the study's trials are in its cache already, as after a worker's first claim),
  each sampler in turn, their order alternating over ``--rounds``;
* ``front``: the default study (``tauopt run``'s built-in config, one process, one thread)
  run for ``--trials`` trials per sampler seed, and the feasible front's hypervolume after
  each of ``--at`` trials (``front_per_hour.hypervolume``). Optuna's default TPE is then
  replayed on the same history: for each trial, a study of the trials before it, the same
  seed's ``TPESampler`` asked as the worker asked; where every proposal is the worker's own,
  both samplers trained the same networks and their fronts are the same.

    python benchmarks/sampler_compare.py ask [--prefill 1000 10000] [--trials 20] [--rounds 3]
    python benchmarks/sampler_compare.py front --data-dir ../shared/data [--seeds 0 1 2 3 4] \\
        [--trials 100] [--at 30 100] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import JSON_HELP, machine, result_path
from front_per_hour import hypervolume
from storage_overhead import REPO, TINY, _distributions, _fake_trial

from tauopt.storage import StorageSettings, WindowedTPESampler
from tauopt.study import create_study, load_config, parse_config
from tauopt.study._objective import suggest_config

SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "windowed": lambda seed: WindowedTPESampler(seed=seed, constant_liar=True),
    "default": lambda seed: optuna.samplers.TPESampler(seed=seed),
}


# -- ask latency -----------------------------------------------------------------------------


def _prefilled(prefill: int, tmp: Path) -> tuple[Any, Any]:
    config = load_config(REPO / "configs" / "study.toml").with_overrides(**TINY)
    settings = StorageSettings(url=f"sqlite:///{tmp}/ask-{prefill}.db")
    study = create_study(settings, "ask", config)
    dists = _distributions(study)
    study.add_trials([_fake_trial(number, dists) for number in range(prefill)])
    return study._storage, config


def _ms_per_trial(storage: Any, config: Any, sampler: Any, trials: int) -> float:
    study = optuna.load_study(study_name="ask", storage=storage, sampler=sampler)
    study.get_trials(deepcopy=False)  # into the cache, as a worker's first claim does

    def one() -> None:
        trial = study.ask()
        suggest_config(trial, config, seed=trial.number)
        study.tell(trial, [0.9, 100_000.0])

    one()  # warm-up
    start = time.perf_counter()
    for _ in range(trials):
        one()
    return (time.perf_counter() - start) / trials * 1e3


def ask(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for prefill in args.prefill:
            storage, config = _prefilled(prefill, Path(tmp))
            times: dict[str, list[float]] = {name: [] for name in SAMPLERS}
            for r in range(args.rounds):
                order = list(SAMPLERS) if r % 2 == 0 else list(reversed(SAMPLERS))
                for name in order:
                    ms = _ms_per_trial(storage, config, SAMPLERS[name](r), args.trials)
                    times[name].append(ms)
                    print(f"prefill {prefill} round {r} {name}: {ms:.1f} ms/trial", flush=True)
            ratios = [d / w for d, w in zip(times["default"], times["windowed"], strict=True)]
            rows.append(
                {
                    "trials_before": prefill,
                    "ms_per_trial": times,
                    "default_over_windowed": ratios,
                    "median_ratio": statistics.median(ratios),
                }
            )
    return {"kind": "ask", "trials": args.trials, "rounds": args.rounds, "results": rows}


# -- the front after n trials ----------------------------------------------------------------


def _run(seed: int, trials: int, data_dir: Path, tmp: Path) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable, "-m", "tauopt", "run",
        "--storage", f"sqlite:///{tmp}/front-{seed}.db",
        "--n-trials", str(trials),
        "--artifact-dir", f"{tmp}/a-{seed}",
        "--data-dir", str(data_dir),
        "--device", "cpu", "--threads", "1", "--quiet",
        "--sampler-seed", str(seed),
    ]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _front_after(trials: list[optuna.trial.FrozenTrial], n: int) -> float:
    done = optuna.trial.TrialState.COMPLETE
    return hypervolume(
        [(t.values[0], t.values[1]) for t in trials if t.number < n and t.state == done]
    )


def _replayed(trials: list[optuna.trial.FrozenTrial], seed: int, config: Any) -> list[bool]:
    """Whether Optuna's default TPE, seeded as the worker's sampler and shown the same
    trials before each ask, proposes each trial's parameters."""
    sampler = SAMPLERS["default"](seed)
    same = []
    for k, stored in enumerate(trials):
        study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
        study.add_trials([t for t in trials[:k] if t.state.is_finished()])
        fixed = stored.system_attrs.get("fixed_params")
        if fixed is not None:
            study.enqueue_trial(fixed)
        trial = study.ask()
        suggest_config(trial, config, seed=stored.number)
        same.append(trial.params == stored.params)
    return same


def front(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pending = list(args.seeds)
        while pending:
            batch, pending = pending[: args.jobs], pending[args.jobs :]
            start = time.time()
            procs = {seed: _run(seed, args.trials, args.data_dir, Path(tmp)) for seed in batch}
            for seed, proc in procs.items():
                _, err = proc.communicate()
                if proc.returncode != 0:
                    raise SystemExit(f"seed {seed}: tauopt run failed:\n{err.decode()[-2000:]}")
            wall = time.time() - start
            for seed in batch:
                study = optuna.load_study(
                    study_name="tauopt", storage=f"sqlite:///{tmp}/front-{seed}.db"
                )
                trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
                config = parse_config(study.user_attrs["tauopt_config"])
                same = _replayed(trials, seed, config)
                hv = {str(n): _front_after(trials, n) for n in args.at}
                row = {
                    "seed": seed,
                    "trials": len(trials),
                    "wall_seconds": round(wall, 1),
                    "hypervolume_windowed": hv,
                    "default_proposals_same": sum(same),
                    "first_different": next((i for i, s in enumerate(same) if not s), None),
                    # the default's front is the windowed one's only where every proposal is
                    "hypervolume_default": hv if all(same) else None,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    return {"kind": "front", "trials": args.trials, "at": args.at, "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    a = commands.add_parser("ask", help="ask latency in a prefilled study")
    a.add_argument("--prefill", type=int, nargs="+", default=[1000, 10000])
    a.add_argument("--trials", type=int, default=20, help="timed trials per sampler and round")
    a.add_argument("--rounds", type=int, default=3)
    f = commands.add_parser("front", help="the front after n trials of the default study")
    f.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    f.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    f.add_argument("--trials", type=int, default=100)
    f.add_argument("--at", type=int, nargs="+", default=[30, 100])
    f.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    for p in (a, f):
        p.add_argument("--json", type=Path, help=JSON_HELP)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)  # ask() by hand
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    result = {**machine(), **(ask(args) if args.command == "ask" else front(args))}
    out = args.json or result_path(__file__, what=args.command)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
