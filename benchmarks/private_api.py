"""What each use of Optuna's and optuna-dashboard's private API in ``storage/_optuna.py`` buys:
tauopt's call against the public one that does the same job, in a SQLite study of the default
search space prefilled with ``--prefill`` finished trials (as ``storage_overhead.py`` fills
it), the two alternating over ``--rounds`` (the median of the per-round ratios is printed).

* ``record``: a finished trial's record (its 25 user attributes and its constraint):
  ``set_trial_attrs`` (one transaction) against ``trial.set_user_attr`` per attribute and
  ``trial.set_constraint``;
* ``counts``: the study's trials per state, its running and waiting trials (``trial_counts``,
  ``running_trials``, ``waiting_trial_ids``: SQL) against ``study.get_trials`` and counting;
* ``front``: the feasible Pareto front of the trials in hand (``pareto_front``) against
  ``study.best_trials``;
* ``figure``: a dashboard figure of one point per trial (``figure_attrs`` and
  ``set_study_system_attrs``: one transaction) against ``save_plotly_graph_object``;
* ``note``: a trial's first dashboard note (``first_note_attrs``, one transaction) against
  ``save_note``;
* ``cache``: ``--readers`` threads reading the study's trials at once while ``--running``
  trials run (``CoalescedCache``) against Optuna's cache of the same storage.

    python benchmarks/private_api.py [--prefill 5000] [--rounds 5] [--cases record counts ...]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import plotly.graph_objects as go
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import JSON_HELP, machine, result_path
from storage_overhead import REPO, TINY, _distributions, _fake_trial

from tauopt.storage import StorageSettings
from tauopt.storage import _optuna as private
from tauopt.study import create_study, load_config

CASES = ("record", "counts", "front", "figure", "note", "cache")


def _record() -> dict[str, Any]:
    """A finished trial's user attributes as a worker writes them (25 keys)."""
    history = [0.9] * 10
    names = ("val_accuracy", "test_accuracy", "train_accuracy", "train_loss", "clean_loss")
    attrs: dict[str, Any] = {f"{name}_history": history for name in (*names, "penalty", "tau")}
    attrs.update({key: 0.9 for key in ("val_accuracy", "test_accuracy", "tau_sum")})
    attrs.update({key: 1 for key in ("active_blocks", "active_params", "initial_params", "seed")})
    attrs.update({"in_features": 784, "num_classes": 10, "taus": [0.1] * 6, "device": "cpu"})
    attrs.update({"active_block_ids": list(range(6)), "pruned_layers": [], "machine": "x"})
    attrs.update({"epoch_seconds": history, "model_artifact_id": None, "resumed_from": []})
    return attrs


class Bench:
    def __init__(self, prefill: int, tmp: Path) -> None:
        config = load_config(REPO / "configs" / "study.toml").with_overrides(**TINY)
        self.study = create_study(
            StorageSettings(url=f"sqlite:///{tmp}/private.db"), "private", config
        )
        dists = _distributions(self.study)
        self.study.add_trials([_fake_trial(number, dists) for number in range(prefill)])
        self.rdb = private.rdb_of(private.storage_of(self.study))
        self.sid = private.study_id(self.study)
        self.trials = self.study.get_trials(deepcopy=False)
        self.attrs = _record()

    def record(self) -> tuple[Callable[[], None], Callable[[], None]]:
        def ours() -> None:
            trial = self.study.ask()
            system = private.constraint_attrs("min_val_accuracy", -0.4)
            private.set_trial_attrs(
                self.rdb, private.trial_id(trial), user=self.attrs, system=system
            )
            self.study.tell(trial, state=TrialState.FAIL)

        def public() -> None:
            trial = self.study.ask()
            for key, value in self.attrs.items():
                trial.set_user_attr(key, value)
            trial.set_constraint("min_val_accuracy", -0.4)
            self.study.tell(trial, state=TrialState.FAIL)

        return ours, public

    def counts(self) -> tuple[Callable[[], None], Callable[[], None]]:
        def ours() -> None:
            private.trial_counts(self.rdb, self.sid, failed_with_attr="fail_reason")
            private.running_trials(self.rdb, self.sid)
            private.waiting_trial_ids(self.rdb, self.sid)

        def public() -> None:
            trials = self.study.get_trials(deepcopy=False)  # through the study's cache
            collections.Counter(t.state for t in trials)
            [t for t in trials if t.state == TrialState.RUNNING]
            [t for t in trials if t.state == TrialState.WAITING]

        return ours, public

    def front(self) -> tuple[Callable[[], None], Callable[[], None]]:
        def ours() -> None:
            private.pareto_front(self.trials, self.study.directions)

        def public() -> None:
            self.study.best_trials  # noqa: B018 (the property is the work)

        return ours, public

    def _figure(self) -> go.Figure:
        xs = [t.values[1] for t in self.trials if t.values]
        ys = [t.values[0] for t in self.trials if t.values]
        return go.Figure(go.Scatter(x=xs, y=ys, mode="markers", text=[str(x) for x in xs]))

    def figure(self) -> tuple[Callable[[], None], Callable[[], None]]:
        figure = self._figure()

        def ours() -> None:
            chunks, prefix = private.figure_attrs(figure.to_json(), "bench")
            private.set_study_system_attrs(self.rdb, self.sid, chunks, clear_prefix=prefix)

        def public() -> None:
            from optuna_dashboard import save_plotly_graph_object

            save_plotly_graph_object(self.study, figure, graph_object_id="bench-public")

        return ours, public

    def note(self) -> tuple[Callable[[], None], Callable[[], None]]:
        body = "### Trial\n" + "| epoch | acc |\n" * 200

        def ours() -> None:
            trial = self.study.ask()
            attrs = private.first_note_attrs(body, private.trial_id(trial))
            private.set_study_system_attrs(self.rdb, self.sid, attrs)
            self.study.tell(trial, state=TrialState.FAIL)

        def public() -> None:
            from optuna_dashboard import save_note

            trial = self.study.ask()
            save_note(trial, body)
            self.study.tell(trial, state=TrialState.FAIL)

        return ours, public


def _cache_case(bench: Bench, readers: int, running: int) -> tuple[Callable[[], None], ...]:
    """Each call: ``readers`` threads read the study's trials once each, at the same moment."""
    for _ in range(running):
        bench.study.ask()  # left running: every read re-reads them

    def run(cache: Any) -> None:
        barrier = threading.Barrier(readers)

        def read() -> None:
            barrier.wait()
            cache.get_all_trials(bench.sid, deepcopy=False)

        threads = [threading.Thread(target=read) for _ in range(readers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    ours, public = private.CoalescedCache(bench.rdb), optuna.storages._CachedStorage(bench.rdb)
    return (lambda: run(ours)), (lambda: run(public))


def timed(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prefill", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5, help="calls per timing")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--readers", type=int, default=32)
    parser.add_argument("--running", type=int, default=200)
    parser.add_argument("--json", type=Path, help=JSON_HELP)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)  # ask() by hand
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(args.prefill, Path(tmp))
        for case in args.cases:
            pair = (
                _cache_case(bench, args.readers, args.running)
                if case == "cache"
                else getattr(bench, case)()
            )
            times: dict[str, list[float]] = {"tauopt": [], "public": []}
            for r in range(args.rounds):
                order = [("tauopt", pair[0]), ("public", pair[1])]
                for name, fn in order if r % 2 == 0 else reversed(order):
                    times[name].append(timed(fn, args.repeats))
            ratios = [p / o for p, o in zip(times["public"], times["tauopt"], strict=True)]
            row = {
                "case": case,
                "ms": times,
                "public_over_tauopt": ratios,
                "median_ms": {k: statistics.median(v) for k, v in times.items()},
                "median_ratio": statistics.median(ratios),
            }
            rows.append(row)
            print(
                f"{case}: tauopt {row['median_ms']['tauopt']:.2f} ms, public "
                f"{row['median_ms']['public']:.2f} ms, ratio {row['median_ratio']:.1f}x",
                flush=True,
            )
    result = {**machine(), "prefill": args.prefill, "rounds": args.rounds, "repeats": args.repeats,
              "readers": args.readers, "running": args.running, "results": rows}  # fmt: skip
    out = args.json or result_path(__file__)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
