"""Per-trial time outside training, in a study of 10 and of 5,000 trials, on SQLite and PostgreSQL.

A study with the default search space (``configs/study.toml``) is filled with ``--prefill``
finished trials shaped like a worker's (parameters from the search space, both objective
values, the metrics a worker stores, a dashboard note each). Then one worker runs ``--trials``
more trials of a tiny size (1 epoch on 100 images), so that training is negligible, and the
time outside training is its wall time per trial minus the trials' own epoch time: claiming
(the study lock, counting, the sampler's ask), suggesting, the metrics, the model's upload,
the tell, the note and the figures (at most every 30 s), and the final test-set evaluation.
It is given twice: over the worker's whole run, and in its steady state (first finished trial
to last), without what a worker pays once when it starts (loading the study into the
storage's cache, the first drawing of the figures) and when it ends (the last drawing).
Usage::

    python benchmarks/storage_overhead.py --data-dir ../shared/data [--prefill 10 5000]
        [--trials 20] [--postgres postgresql+psycopg2://postgres@127.0.0.1:5432/test]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from _machine import JSON_HELP, result_path

from tauopt.storage import StorageSettings, open_storage
from tauopt.study import (
    Worker,
    WorkerOptions,
    create_study,
    load_config,
    parse_config,
    suggest_config,
)
from tauopt.study._figures import write_trial_note

REPO = Path(__file__).resolve().parent.parent
TINY = {"epochs": 1, "train_size": 100}


def _fake_trial(
    number: int, distributions: dict[str, optuna.distributions.BaseDistribution]
) -> optuna.trial.FrozenTrial:
    rng = random.Random(number)
    params: dict[str, Any] = {}
    for name, dist in distributions.items():
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            params[name] = rng.choice(dist.choices)
        elif isinstance(dist, optuna.distributions.FloatDistribution):
            params[name] = rng.uniform(dist.low, dist.high)
        elif isinstance(dist, optuna.distributions.IntDistribution):
            params[name] = rng.randint(dist.low, dist.high)
    accuracy = rng.uniform(0.8, 0.98)
    blocks = rng.randint(2, 6)
    history = [[rng.uniform(0, 0.5) for _ in range(6)] for _ in range(10)]
    return optuna.trial.create_trial(
        params=params,
        distributions=distributions,
        values=[accuracy, 78_500.0 + 10_100 * blocks],
        user_attrs={
            "val_accuracy": accuracy,
            "test_accuracy": accuracy,
            "val_accuracy_history": [accuracy] * 10,
            "tau_history": history,
            "taus": history[-1][:blocks],
            "active_blocks": blocks,
            "epoch_seconds": [0.6] * 10,
            "seed": number,
        },
        system_attrs={"constraints:min_val_accuracy": 0.5 - accuracy},
    )


def _distributions(study: optuna.Study) -> dict[str, optuna.distributions.BaseDistribution]:
    """The search space as a worker's trials record it, conditional parameters included: ask
    and suggest until every parameter was seen (those trials are failed, outside the budget)."""
    config = parse_config(study.user_attrs["tauopt_config"])
    dists: dict[str, optuna.distributions.BaseDistribution] = {}
    for _ in range(50):
        trial = study.ask()
        suggest_config(trial, config, seed=0)
        dists.update(trial.distributions)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        if {"gamma", "layer_prune_eps", "horizon_weight"} <= set(dists):
            break
    return dists


def measure(url: str, prefill: int, trials: int, data_dir: Path, tmp: Path) -> dict[str, Any]:
    name = f"overhead-{uuid.uuid4().hex[:8]}"
    config = load_config(REPO / "configs" / "study.toml")
    config = config.with_overrides(n_trials=prefill + trials + 1, **TINY)
    settings = StorageSettings(url=url)
    study = create_study(settings, name, config)
    dists = _distributions(study)
    start = time.perf_counter()
    for number in range(prefill):
        study.add_trial(_fake_trial(number, dists))
    notes = study.get_trials(deepcopy=False)
    for frozen in notes[-prefill:] if prefill else []:
        trial = optuna.Trial(study, frozen._trial_id)
        write_trial_note(trial, "## trial\n" + "x" * 1200)  # about a real note's length
    filled = time.perf_counter() - start
    options = WorkerOptions(
        data_dir=data_dir, device="cpu", artifact_dir=tmp / name, quiet=True, sampler_seed=1
    )
    worker = Worker(settings, name, options)
    worker.dataset()  # loaded before the clock starts: a worker loads it once
    start = time.perf_counter()
    summary = worker.run()
    wall = time.perf_counter() - start
    ran = [
        t
        for t in optuna.load_study(study_name=name, storage=open_storage(settings)).trials
        if "worker" in t.user_attrs and t.state.is_finished()
    ]
    done = [t for t in ran if t.state == optuna.trial.TrialState.COMPLETE]
    epochs = sum(sum(t.user_attrs["epoch_seconds"]) for t in done)
    # Steady state: from the first finished trial to the last, which leaves out what a worker
    # pays once (loading the study into the storage's cache at its first claim, the first
    # drawing of the figures) and the last drawing at its end.
    ran.sort(key=lambda t: t.datetime_complete)
    span = (ran[-1].datetime_complete - ran[0].datetime_complete).total_seconds()
    later = sum(sum(t.user_attrs.get("epoch_seconds", [])) for t in ran[1:])
    return {
        "storage": url.split(":")[0],
        "trials_before": prefill,
        "trials_run": summary.trials_run,
        "fill_seconds": filled,
        "wall_seconds": wall,
        "outside_training_per_trial_s": (wall - epochs) / max(summary.trials_run, 1),
        "steady_outside_training_per_trial_s": (span - later) / max(len(ran) - 1, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--prefill", type=int, nargs="+", default=[10, 5000])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--postgres", default="postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    parser.add_argument("--json", type=Path, help=JSON_HELP)
    args = parser.parse_args()
    args.json = args.json or result_path(__file__)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    results = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        admin = sqlalchemy.create_engine(args.postgres, isolation_level="AUTOCOMMIT")
        for prefill in args.prefill:
            db = f"tauopt_overhead_{uuid.uuid4().hex[:8]}"
            with admin.connect() as conn:
                conn.execute(sqlalchemy.text(f'CREATE DATABASE "{db}"'))
            pg = sqlalchemy.engine.make_url(args.postgres).set(database=db)
            urls = [f"sqlite:///{tmp}/{db}.db", pg.render_as_string(hide_password=False)]
            try:
                for url in urls:
                    result = measure(url, prefill, args.trials, args.data_dir, tmp)
                    results.append(result)
                    print(json.dumps(result), flush=True)
            finally:
                with admin.connect() as conn:
                    conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
