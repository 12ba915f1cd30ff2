"""Paired evidence: the grid's composition, the interval by hand, and verdicts that come out
right on synthetic studies with a known effect and with none."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import optuna
import pytest

from tauopt.engine import group_key
from tauopt.study import TrialRecord, grid, write_report
from tauopt.study._evidence import Factor, difference, epochs_to, pairs, t_quantile
from tauopt.study._reproduce import MATCHED_RATES, REPRODUCE_ATTR, TAU_ARMS, factor_choices


def test_the_authors_grid_is_their_main_py() -> None:
    runs = grid(protocol="authors", seeds=1)
    assert len(runs) == 76
    for dataset in ("mnist", "fashion-mnist"):
        resnet = [
            r for r in runs if r.coords["dataset"] == dataset and r.coords["arch"] == "resnet"
        ]
        frac = [r for r in runs if r.coords["dataset"] == dataset and r.coords["arch"] == "fracdnn"]
        assert len(resnet) == 26 and len(frac) == 12
        for arm in ("fixed", "input-fixed"):  # every tau fixed; the papers' code's "fixed"
            fixed = [r for r in resnet if r.coords["taus"] == arm]
            assert {(r.config.T, r.coords["pruning"]) for r in fixed} == {
                (1.0, "off"), (1.0, "smallest"), (6.0, "off"), (6.0, "smallest")
            }  # fmt: skip
            assert all(r.config.l1 == 0 and r.config.horizon_weight == 0 for r in fixed)
        assert {r.coords["taus"] for r in frac} == {"fixed", "trainable"}
        assert sum(r.config.projected_last_tau for r in resnet) == 2
        assert all(r.config.detach_memory and r.config.gamma == 0.5 for r in frac)
    for run in runs:
        c = run.config
        assert (c.epochs, c.train_size, c.val_size, c.lr, c.batch_size) == (200, None, 0, 0.01, 100)
        assert c.l1 in (0.0, 0.01) and c.horizon_weight in (0.0, 0.5)
        assert c.prune_eps in (None, 0.01) and c.prune_rule == "smallest"
        if c.projected_last_tau:  # the dependent last tau alone
            assert (c.l1, c.horizon_weight, c.prune_eps, c.fixed_tau) == (0.0, 0.0, None, False)
    assert len({r.key for r in grid(seeds=3)}) == 3 * 76
    assert len(grid(protocol="tauopt", seeds=1)) == 104


def test_a_seed_draws_weights_order_and_split_and_its_runs_share_them() -> None:
    runs = grid(protocol="authors", seeds=3, datasets=("mnist",))
    draws = {(r.config.seed, r.config.order_seed, r.config.split_order) for r in runs}
    assert len(draws) == 3  # one triple per seed, shared by its runs
    assert len({d[1] for d in draws}) == 3 and len({d[2] for d in draws}) == 3
    assert all(len(set(d)) == 3 for d in draws)  # three different seeds within a run
    later = grid(protocol="authors", seeds=2, first_seed=3, datasets=("mnist",))
    assert {r.config.seed for r in later} == {3, 4}
    assert not {r.key for r in later} & {r.key for r in runs}
    # runs of one seed and shape lie next to each other: a worker's claim is a population
    seeds = [r.config.seed for r in runs]
    assert seeds == sorted(seeds)


def test_the_lr_matched_grid_crosses_arms_and_rates() -> None:
    runs = grid(protocol="lr-matched", seeds=1)
    assert len(runs) == 24 and {r.config.arch for r in runs} == {"resnet"}
    for dataset in ("mnist", "fashion-mnist"):
        at_one = {
            (r.coords["taus"], r.coords["lr"])
            for r in runs
            if r.config.T == 1.0 and r.config.dataset == dataset
        }
        assert at_one == {(a, lr) for a in TAU_ARMS for lr in MATCHED_RATES}
        at_six = {
            (r.coords["taus"], r.config.lr)
            for r in runs
            if r.config.T == 6.0 and r.config.dataset == dataset
        }
        assert at_six == {(a, 0.01) for a in TAU_ARMS}
    for run in runs:
        c = run.config
        assert (c.epochs, c.train_size, c.val_size) == (200, None, 10_000)
        assert (c.l1, c.horizon_weight, c.prune_eps, c.projected_last_tau) == (0, 0, None, False)
        assert run.coords["lr"] == c.lr
    # one population per dataset and seed: every arm and rate trains together
    assert len({group_key(r.config) for r in runs}) == 2


def test_cells_select_parts_of_the_grid() -> None:
    both = grid(seeds=1, only=("fixed-vs-trainable",))
    # dataset x T x (ResNet: fixed, input-fixed, trainable; FracDNN: fixed, trainable)
    assert len(both) == 2 * 2 * (3 + 2)
    assert all(r.config.l1 == 0 and r.config.prune_eps is None for r in both)
    pruning = grid(seeds=1, only=("pruning",))
    assert {(r.config.arch, r.config.l1, r.coords["pruning"]) for r in pruning} == {
        ("resnet", 0.01, "off"), ("resnet", 0.01, "smallest")
    }  # fmt: skip
    choices = factor_choices(pruning)
    assert choices["pruning"] == ["off", "smallest"] and choices["T"] == [1.0, 6.0]


def test_the_interval_by_hand() -> None:
    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.303 -> half width 4.303 / sqrt(3)
    d = difference([1.0, 2.0, 3.0])
    assert d.n == 3 and d.mean == 2.0
    assert (
        d.low == pytest.approx(2 - 4.303 / math.sqrt(3)) and d.verdict == "no difference detected"
    )
    assert difference([1.0, 1.1, 0.9, 1.05]).verdict == "higher"
    assert difference([-1.0, -1.1, -0.9]).verdict == "lower"
    assert difference([0.5]).verdict == "one seed: no interval" and difference([]).n == 0
    assert t_quantile(1) == 12.706 and t_quantile(30) == 2.042 and t_quantile(45) == 2.021
    assert epochs_to([0.1, 0.5, 0.9], 0.5) == 2.0 and math.isnan(epochs_to([0.1], 0.5))


def test_pairs_agree_on_everything_but_the_factor() -> None:
    runs = [
        {"taus": "fixed", "T": 1.0, "seed": 0},
        {"taus": "trainable", "T": 1.0, "seed": 0},
        {"taus": "trainable", "T": 1.0, "seed": 1},  # no fixed partner of seed 1
        {"taus": "fixed", "T": 6.0, "seed": 0},
        {"taus": "trainable", "T": 6.0, "seed": 0},
    ]
    found = pairs(runs, Factor("taus", "taus", "fixed", ""), lambda r: r)
    assert found == [(runs[0], runs[1]), (runs[3], runs[4])]


def _synthetic_study(path: Path, effect: float, noise: float) -> optuna.Study:
    """A grid of the authors' fixed-vs-trainable cells whose final test accuracy is 0.8 plus
    ``effect`` for trainable taus, plus seeded noise; T does nothing."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{path}", study_name="synthetic")
    runs = grid(epochs=3, seeds=6, datasets=("mnist",), only=("fixed-vs-trainable",))
    rng = random.Random(0)
    for run in runs:
        accuracy = 0.8 + (effect if run.coords["taus"] == "trainable" else 0.0)
        accuracy += rng.gauss(0.0, noise)
        record = TrialRecord(
            train_config=run.config.to_dict(),
            test_accuracy=accuracy,
            val_accuracy=None,
            active_blocks=6,
            active_params=130006,
            initial_params=130006,
            in_features=784,
            num_classes=10,
            taus=[1 / 6] * 6,
            test_accuracy_history=[accuracy - 0.2, accuracy - 0.1, accuracy],
            train_accuracy_history=[accuracy + 0.01] * 3,
            clean_loss_history=[1.0, 0.5, 0.3],
            tau_history=[[1 / 6] * 6] * 3,
            grid_point=run.coords,
        )
        attrs = {**record.to_attrs(), "grid_point": run.coords}
        study.add_trial(optuna.trial.create_trial(value=accuracy, user_attrs=attrs))
    spec = {"protocol": "authors", "epochs": 3, "train_size": None, "runs": len(runs)}
    study.set_user_attr(REPRODUCE_ATTR, {"spec": spec, "complete": True})
    return study


def _verdicts(report: str, factor: str) -> set[str]:
    section = report.split("### Final test accuracy")[1].split("###")[0]
    rows = [r for r in section.splitlines() if r.startswith(f"| {factor} |")]
    assert rows, factor
    return {re.split(r"\s*\|\s*", r.strip("| "))[-1] for r in rows}


def test_a_known_effect_is_found_and_no_effect_is_not_claimed(tmp_path: Path) -> None:
    study = _synthetic_study(tmp_path / "s.db", effect=0.05, noise=0.01)
    write_report(study, tmp_path / "rep")
    report = (tmp_path / "rep" / "report.md").read_text()
    assert _verdicts(report, "trainable vs fixed taus") == {"higher"}
    assert _verdicts(report, "T = 6 vs T = 1") == {"no difference detected"}
    row = next(
        r
        for r in report.splitlines()
        if r.startswith("| trainable vs fixed taus | trainable - fixed | resnet")
    )
    low, high = (float(x) for x in re.findall(r"\[([-+.\d]+), ([-+.\d]+)\]", row)[0])
    assert low < 0.05 < high  # the interval holds the true effect


def test_no_effect_gives_no_verdict(tmp_path: Path) -> None:
    study = _synthetic_study(tmp_path / "n.db", effect=0.0, noise=0.01)
    write_report(study, tmp_path / "rep")
    report = (tmp_path / "rep" / "report.md").read_text()
    assert _verdicts(report, "trainable vs fixed taus") == {"no difference detected"}


def test_pairs_of_one_seed_count_once() -> None:
    """Two pairs of one seed (a setting that changed nothing repeats a pair) are one unit."""
    from tauopt.study._evidence import by_unit

    d = by_unit([(0, 0.1), (0, 0.1), (1, 0.3), (1, 0.3), (2, 0.2)])
    assert d.n == 3 and d.mean == pytest.approx(0.2)
    assert by_unit([(0, 0.5), (0, 0.7)]).verdict == "one seed: no interval"
