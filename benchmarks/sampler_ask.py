"""The sampler's share of the time outside training: ask, the suggestions and tell per trial.

A SQLite study of the default search space is filled as ``storage_overhead.py`` fills it
(``--prefill`` finished trials with metrics and notes); then, in this process, a study loaded
with the workers' sampler (``WindowedTPESampler``, constant liar) asks, suggests a trial's
parameters as a worker does and tells a result, ``--trials`` times after a warm-up. The
study's trials are in the storage's cache already (a worker loads them once, at its first
claim), so this is what each further trial costs.

    python benchmarks/sampler_ask.py [--prefill 10 5000] [--trials 30]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna

from tauopt.storage import StorageSettings, WindowedTPESampler
from tauopt.study import create_study, load_config
from tauopt.study._objective import suggest_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from storage_overhead import REPO, TINY, _distributions, _fake_trial


def measure(prefill: int, trials: int, tmp: Path) -> dict[str, float]:
    config = load_config(REPO / "configs" / "study.toml").with_overrides(**TINY)
    settings = StorageSettings(url=f"sqlite:///{tmp}/ask-{prefill}.db")
    study = create_study(settings, "ask", config)
    dists = _distributions(study)
    for number in range(prefill):
        study.add_trial(_fake_trial(number, dists))
    sampler = WindowedTPESampler(seed=1, constant_liar=True)
    study = optuna.load_study(study_name="ask", storage=study._storage, sampler=sampler)
    study.get_trials(deepcopy=False)  # into the cache, as a worker's first claim does

    def one() -> None:
        trial = study.ask()
        suggest_config(trial, config, seed=trial.number)
        study.tell(trial, [0.9, 100_000.0])

    for _ in range(3):
        one()
    start = time.perf_counter()
    for _ in range(trials):
        one()
    return {"trials_before": prefill, "ms_per_trial": (time.perf_counter() - start) / trials * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefill", type=int, nargs="+", default=[10, 5000])
    parser.add_argument("--trials", type=int, default=30)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)  # ask() by hand
    with tempfile.TemporaryDirectory() as tmp:
        for prefill in args.prefill:
            print(json.dumps(measure(prefill, args.trials, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
