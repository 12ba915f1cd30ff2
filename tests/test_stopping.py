"""Stopping poor trials early: the dominance rule of a Pareto study, alone and in a batch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
from test_faults import Worker

from tauopt._cli import main
from tauopt.errors import ConfigError
from tauopt.storage import OVER_BUDGET_ATTR
from tauopt.study import load_study, parse_config
from tauopt.study._config import stop_rule
from tauopt.study._record import rungs_of
from tauopt.study._stopping import dominates, rungs
from tauopt.study._views import front_numbers

SMALL = """
[study]
min_val_accuracy = 0.0
stop_trials = "dominated"
anchors = 0  # every trial drawn: anchors would take 3 of the 16 at the good learning rates
[search]
arch = "resnet"
depth = 3
width = 16
lr = [0.0001, 0.3, 0.31]  # choices: hopeless or good
layer_prune_eps = 0.02
l1 = 0.0
time_reg = "none"
[trial]
epochs = 4
train_size = 1000
val_size = 1000
"""


def test_rungs_and_dominance_by_hand() -> None:
    assert rungs(4) == {1, 2} and rungs(9) == {1, 2, 4, 8} and rungs(1) == set()
    assert dominates((0.9, 100.0), (0.8, 100.0)) and dominates((0.8, 90.0), (0.8, 100.0))
    assert not dominates((0.8, 100.0), (0.8, 100.0))  # equal: no better in either
    assert not dominates((0.95, 200.0), (0.8, 100.0))  # more accurate but larger


def test_rules_that_cannot_work_are_refused() -> None:
    assert stop_rule("auto", "accuracy") == "median" and stop_rule("auto", "pareto") == "off"
    with pytest.raises(ConfigError, match="'median' needs one objective"):
        parse_config({"study": {"stop_trials": "median"}})
    with pytest.raises(ConfigError, match="is not one of"):
        parse_config({"study": {"stop_trials": "sometimes"}})


def assert_dominated_rule(storage: str | None, study_name: str = "tauopt") -> None:
    """The 16 trials of a ``SMALL`` study all ended; some stopped, by the stored rule, with
    their record, and none of those is on the front. (Through the proxy, a trial asked past
    the budget fails itself and uses none of it: not one of the 16.)"""
    study = load_study(storage, study_name)
    every = study.get_trials()
    trials = [t for t in every if OVER_BUDGET_ATTR not in t.user_attrs]
    seen = [(t.number, t.state.name, sorted(t.user_attrs)[:4]) for t in every]
    assert len(trials) == 16, seen
    assert not any(t.state.name in ("RUNNING", "WAITING") for t in trials), seen
    stopped = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert stopped, "the hopeless learning rate should be dominated early"
    rungs_of_all = {t.number: rungs_of(t.user_attrs) for t in trials}
    for t in stopped:
        history = t.user_attrs["train_accuracy_history"]
        assert 1 <= len(history) < 4  # its record, up to the rung that stopped it
        epoch = max(rungs_of_all[t.number])
        mine = rungs_of_all[t.number][epoch]
        others = [r[epoch] for n, r in rungs_of_all.items() if n != t.number and epoch in r]
        assert sum(dominates(o, mine) for o in others) >= 3  # the rule, as stored
    assert any(t.params["lr"] == 0.0001 for t in stopped)
    assert not {t.number for t in stopped} & front_numbers(study)


@pytest.mark.parametrize("k", ["1", "8"])
def test_dominated_trials_stop_keep_their_record_and_never_reach_the_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Path, k: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "small.toml").write_text(SMALL)
    argv = ["run", "--config", "small.toml", "--n-trials", "16", "--data-dir", str(data_dir)]
    assert main([*argv, "--quiet", "--sampler-seed", "3", "--batch-trials", k]) == 0
    assert_dominated_rule(None)


def run_two_workers(url: str, tmp_path: Path, data_dir: Path) -> None:
    """Create the ``SMALL`` study in ``url`` and run it with two worker processes at once,
    one trial at a time and four at a time."""
    (tmp_path / "small.toml").write_text(SMALL)
    create = ["create", "--storage", url, "--config", str(tmp_path / "small.toml")]
    assert main([*create, "--n-trials", "16"]) == 0
    artifacts = tmp_path / "artifacts"
    workers = [
        Worker(url, "tauopt", artifacts, data_dir, 3),
        Worker(url, "tauopt", artifacts, data_dir, 4, "--batch-trials", "4"),
    ]
    codes = [w.finish() for w in workers]
    assert codes == [0, 0], "\n---\n".join(w.output for w in workers)


@pytest.mark.postgres
def test_dominated_stopping_on_postgresql_with_two_workers(
    scratch_database: tuple[str, Callable[[], None]], tmp_path: Path, data_dir: Path
) -> None:
    run_two_workers(scratch_database[0], tmp_path, data_dir)
    assert_dominated_rule(scratch_database[0])
