"""Paired evidence: the grid's composition, the interval by hand, and verdicts that come out
right on synthetic studies with a known effect and with none."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest

from tauopt.engine import History, group_key
from tauopt.errors import ConfigError
from tauopt.study import GridPoint, GridRun, TrialRecord, grid, write_report
from tauopt.study._evidence import (
    Factor,
    benjamini_hochberg,
    difference,
    epochs_to,
    holm,
    pairs,
    t_quantile,
    t_two_sided_p,
)
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
    # more rates as a study of their own: T = 1 only (T = 6 comes with 0.01), keys of their own
    more = grid(protocol="lr-matched", seeds=1, rates=(0.3, 1.0))
    assert {(r.config.T, r.config.lr) for r in more} == {(1.0, 0.3), (1.0, 1.0)}
    assert len(more) == 12 and not {r.key for r in more} & {r.key for r in runs}
    with pytest.raises(ConfigError, match="lr-matched protocol only"):
        grid(protocol="authors", rates=(0.3,))
    with pytest.raises(ConfigError, match="positive learning rates"):
        grid(protocol="lr-matched", rates=(-0.1,))


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


def _record(run: GridRun, accuracy: float, val: float | None = None) -> TrialRecord:
    return TrialRecord(
        config=run.config,
        test_accuracy=accuracy,
        val_accuracy=val,
        active_blocks=6,
        active_params=130006,
        initial_params=130006,
        in_features=784,
        num_classes=10,
        taus=[1 / 6] * 6,
        history=History(
            val_accuracy=[] if val is None else [val - 0.1, val],
            test_accuracy=[accuracy - 0.2, accuracy - 0.1, accuracy],
            train_accuracy=[accuracy + 0.01] * 3,
            clean_loss=[1.0, 0.5, 0.3],
            taus=[[1 / 6] * 6] * 3,
        ),
        grid_point=GridPoint.of(run.coords),
    )


def _synthetic_study(
    path: Path,
    effect: float,
    noise: float,
    *,
    at_T: tuple[float, ...] = (1.0, 6.0),
    seeds: int = 6,
    protocol: str = "authors",
    accuracy: Callable[[GridRun, random.Random], tuple[float, float | None]] | None = None,
) -> optuna.Study:
    """A grid's runs whose final test accuracy is 0.8, plus ``effect`` for trainable taus at
    the horizons ``at_T``, plus seeded noise (or whatever ``accuracy`` says); nothing else
    matters."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{path}", study_name="synthetic")
    only = ("fixed-vs-trainable",) if protocol == "authors" else ()
    runs = grid(protocol=protocol, epochs=3, seeds=seeds, datasets=("mnist",), only=only)
    rng = random.Random(0)
    for run in runs:
        if accuracy is not None:
            test, val = accuracy(run, rng)
        else:
            trained = run.coords["taus"] == "trainable" and run.config.T in at_T
            test, val = 0.8 + (effect if trained else 0.0) + rng.gauss(0.0, noise), None
        attrs = {**_record(run, test, val).to_attrs(), "grid_point": run.coords}
        study.add_trial(optuna.trial.create_trial(value=test, user_attrs=attrs))
    spec = {"protocol": protocol, "epochs": 3, "train_size": None, "runs": len(runs)}
    study.set_user_attr(REPRODUCE_ATTR, {"spec": spec, "complete": True})
    return study


def _rows(report: str, factor: str, table: str = "### Final test accuracy") -> list[list[str]]:
    section = report.split(table)[1].split("\n###")[0].split("\n## ")[0]
    rows = [r for r in section.splitlines() if r.startswith(f"| {factor} |")]
    assert rows, factor
    return [re.split(r"\s*\|\s*", r.strip("| ")) for r in rows]


def _verdicts(report: str, factor: str) -> set[str]:
    return {row[-1] for row in _rows(report, factor)}


def test_a_known_effect_is_found_and_no_effect_is_not_claimed(tmp_path: Path) -> None:
    study = _synthetic_study(tmp_path / "s.db", effect=0.05, noise=0.01)
    write_report(study, tmp_path / "rep")
    report = (tmp_path / "rep" / "report.md").read_text()
    assert _verdicts(report, "trainable vs fixed taus") == {"higher (Holm)"}
    assert _verdicts(report, "T = 6 vs T = 1") == {"no difference detected"}
    row = next(
        r
        for r in report.splitlines()
        if r.startswith("| trainable vs fixed taus | trainable - fixed | resnet")
    )
    low, high = (float(x) for x in re.findall(r"\[([-+.\d]+), ([-+.\d]+)\]", row)[0])
    assert low < 5.0 < high  # the interval holds the true effect, in percentage points
    assert "+5." in row or "+4." in row


def test_no_effect_gives_no_verdict(tmp_path: Path) -> None:
    study = _synthetic_study(tmp_path / "n.db", effect=0.0, noise=0.01)
    write_report(study, tmp_path / "rep")
    report = (tmp_path / "rep" / "report.md").read_text()
    assert _verdicts(report, "trainable vs fixed taus") == {"no difference detected"}


def test_every_factor_is_split_by_T_so_an_effect_at_one_horizon_is_not_halved(
    tmp_path: Path,
) -> None:
    """An effect at T = 1 only: its own row finds it whole; T = 6 has a row of its own."""
    study = _synthetic_study(tmp_path / "t.db", effect=0.03, noise=0.002, at_T=(1.0,))
    write_report(study, tmp_path / "rep")
    report = (tmp_path / "rep" / "report.md").read_text()
    rows = {r[4]: r for r in _rows(report, "trainable vs fixed taus") if r[2] == "resnet"}
    assert set(rows) == {"T=1", "T=6"}
    low, high = (float(x) for x in re.findall(r"[-+.\d]+", rows["T=1"][7]))
    assert low < 3.0 < high and 2.5 < float(rows["T=1"][6].split()[0]) < 3.5  # not halved
    assert rows["T=1"][-1] == "higher (Holm)"
    assert rows["T=6"][-1] == "no difference detected"
    assert not any("pooled" in r for r in report.splitlines() if r.startswith("| trainable"))


def test_seeds_that_all_agree_get_no_verdict(tmp_path: Path) -> None:
    """Identical differences in every seed: an interval of zero width, shown, no verdict."""

    def same(run: GridRun, rng: random.Random) -> tuple[float, float | None]:
        return (0.85 if run.coords["taus"] == "trainable" else 0.80), None

    study = _synthetic_study(tmp_path / "z.db", 0.0, 0.0, accuracy=same)
    write_report(study, tmp_path / "rep")
    report = (tmp_path / "rep" / "report.md").read_text()
    for row in _rows(report, "trainable vs fixed taus"):
        assert row[7] == "[+5.00, +5.00]" and row[-1] == "all seeds equal" and row[8] == "-"
    assert "get no verdict" in report


def test_the_report_counts_its_comparisons_and_corrects_them(tmp_path: Path) -> None:
    """Many weak effects: some intervals exclude 0 unadjusted, fewer survive Holm; the
    counts in the text match the tables."""
    study = _synthetic_study(tmp_path / "h.db", effect=0.012, noise=0.01, seeds=4)
    write_report(study, tmp_path / "rep")
    report = (tmp_path / "rep" / "report.md").read_text()
    tested = [
        r
        for r in report.splitlines()
        if r.startswith("| ") and re.search(r"\| (<0\.001|[01]\.\d{3}) \|", r)
    ]
    count = int(re.search(r"makes \*\*(\d+) comparisons\*\*", report).group(1))  # type: ignore[union-attr]
    assert count == len(tested) > 0
    kept = int(re.search(r"\*\*(\d+) survives? Holm", report).group(1))  # type: ignore[union-attr]
    assert kept == sum(r.endswith("(Holm) |") for r in tested)
    assert "n = 4 seeds" in report  # few seeds: the normality caveat


def test_each_arm_at_its_best_learning_rate(tmp_path: Path) -> None:
    """lr-matched: the validation accuracy picks each arm's rate, the test accuracy at that
    rate compares the arms. Here fixed taus peak at lr 0.1, trainable ones at 0.03, and at
    their best rates the arms are equal; at lr 0.01 trainable taus would look far ahead."""
    peak = {"fixed": {0.01: 0.70, 0.03: 0.80, 0.1: 0.90}, "trainable": {0.01: 0.85, 0.03: 0.90,
            0.1: 0.88}, "input-fixed": {0.01: 0.84, 0.03: 0.89, 0.1: 0.87}}  # fmt: skip

    def accuracy(run: GridRun, rng: random.Random) -> tuple[float, float | None]:
        value = peak[run.coords["taus"]][run.config.lr] + rng.gauss(0.0, 0.002)
        return value, value + 0.01

    study = _synthetic_study(tmp_path / "lr.db", 0.0, 0.0, protocol="lr-matched", accuracy=accuracy)
    write_report(study, tmp_path / "rep")
    report = (tmp_path / "rep" / "report.md").read_text()
    best = {r[0]: r for r in _rows(report, "trainable - fixed", "### Each arm at its best")}
    assert set(best) == {"trainable - fixed"}
    (row,) = [r for r in _rows(report, "trainable - fixed", "### Each arm at its best")]
    assert row[3] == "1" and row[-1] == "no difference detected"  # equal at their best rates
    chosen = report.split("### The learning rates chosen")[1].split("###")[0]
    rows = {r.split(" | ")[3]: r for r in chosen.splitlines() if r.startswith("| resnet")}
    assert rows["fixed"].endswith("| lr 0.1: 6 |")
    assert rows["trainable"].endswith("| lr 0.03: 6 |")
    at_001 = [r for r in _rows(report, "trainable vs fixed taus") if "lr=0.01" in r[4]]
    assert at_001 and at_001[0][-1] == "higher (Holm)"  # one rate alone misleads
    assert (tmp_path / "rep" / "learning_rates.png").stat().st_size > 10_000


def test_failed_runs_are_counted_and_left_out(tmp_path: Path) -> None:
    study = _synthetic_study(tmp_path / "f.db", effect=0.05, noise=0.01, seeds=3)
    run = grid(epochs=3, seeds=1, datasets=("mnist",), only=("fixed-vs-trainable",))[0]
    attrs = {"grid_point": run.coords, "fail_reason": "training diverged in epoch 7: loss is nan"}
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs=attrs))
    write_report(study, tmp_path / "rep")
    report = (tmp_path / "rep" / "report.md").read_text()
    failed = report.split("## Runs that failed")[1].split("\n## ")[0]
    assert "1 run failed" in failed and "| training diverged in epoch: loss is nan | 7 |" in failed


def test_the_p_value_and_the_corrections_by_hand() -> None:
    # df = 2: p = 1 - t / sqrt(2 + t^2); t = 0.5 gives 1 - 0.5 / 1.5 = 2/3
    assert t_two_sided_p(0.5, 2) == pytest.approx(2 / 3, rel=1e-12)
    assert t_two_sided_p(12.706, 1) == pytest.approx(0.05, abs=1e-4)  # the table's quantiles
    assert t_two_sided_p(2.776, 4) == pytest.approx(0.05, abs=1e-4)
    assert t_two_sided_p(2.042, 30) == pytest.approx(0.05, abs=1e-4)
    # Holm: sorted 0.005 0.01 0.03 0.04 times 4 3 2 1, then made monotone
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: from the largest down, p * m / rank, then made monotone
    assert benjamini_hochberg([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    d = difference([1.0, 1.0, 1.0])
    assert d.all_equal and d.p_value is None and d.verdict == "all seeds equal"
    assert difference([1.0, 1.1, 0.9]).corrected(0.01) == "higher (Holm)"
    assert difference([1.0, 1.1, 0.9]).corrected(0.2) == "higher (unadjusted only)"


def test_the_p_value_agrees_with_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for t, df in [(0.3, 1), (1.7, 3), (3.2, 7), (25.0, 29), (2.1, 100)]:
        assert t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(t, df), rel=1e-9)


def test_pairs_of_one_seed_count_once() -> None:
    """Two pairs of one seed (a setting that changed nothing repeats a pair) are one unit."""
    from tauopt.study._evidence import by_unit

    d = by_unit([(0, 0.1), (0, 0.1), (1, 0.3), (1, 0.3), (2, 0.2)])
    assert d.n == 3 and d.mean == pytest.approx(0.2)
    assert by_unit([(0, 0.5), (0, 0.7)]).verdict == "one seed: no interval"
