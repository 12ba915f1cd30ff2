"""The workers' TPE sampler models a bounded window of the study's history."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from tauopt.study._sampler import WindowedTPESampler, _RecentTrials


def _study(n_finished: int, window: int) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = WindowedTPESampler(window=window, seed=0, constant_liar=True, n_startup_trials=3)
    study = optuna.create_study(sampler=sampler)
    for i in range(n_finished):
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": float(i)},
                distributions={"x": optuna.distributions.FloatDistribution(-100, 100)},
                value=float(i),
            )
        )
    return study


def test_tpe_sees_the_latest_finished_trials_and_every_running_one() -> None:
    study = _study(20, window=5)
    running = study.ask()
    view = _RecentTrials(study, 5)
    seen = view._get_trials(deepcopy=False, states=None)
    finished = [t.number for t in seen if t.state.is_finished()]
    assert finished == [15, 16, 17, 18, 19]
    assert [t.number for t in seen if t.state == TrialState.RUNNING] == [running.number]
    assert view.directions == study.directions  # everything else is the study's


def test_suggestions_come_from_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """The good trials (x near 0) are all older than the window: TPE no longer knows them."""
    study = _study(60, window=10)
    sizes: list[int] = []
    real = _RecentTrials._get_trials

    def spy(self: _RecentTrials, *args: object, **kwargs: object) -> list[object]:
        trials = real(self, *args, **kwargs)  # type: ignore[arg-type]
        sizes.append(sum(t.state.is_finished() for t in trials))
        return trials  # type: ignore[return-value]

    monkeypatch.setattr(_RecentTrials, "_get_trials", spy)
    trial = study.ask()
    x = trial.suggest_float("x", -100, 100)
    assert sizes and max(sizes) == 10
    assert -100 <= x <= 100


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window must be an integer >= 1, got 0"):
        WindowedTPESampler(window=0)


def _objective(trial: optuna.Trial) -> tuple[float, float]:
    """Two objectives over a conditional space, like the default study's."""
    arch = trial.suggest_categorical("arch", ["a", "b"])
    x = trial.suggest_float("x", 0.01, 10.0, log=True)
    y = trial.suggest_float("y", -1.0, 1.0) if arch == "b" else 0.0
    n = trial.suggest_int("n", 1, 6)
    return (x - 2.0) ** 2 + y, float(n) + (arch == "a")


@pytest.mark.parametrize("liar", [True, False])
def test_within_the_window_the_proposals_are_tpes_own(liar: bool) -> None:
    """Same seed, same trials: the cached split and window change nothing TPE proposes."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    proposals = []
    for sampler in (
        optuna.samplers.TPESampler(seed=3, constant_liar=liar, n_startup_trials=5),
        WindowedTPESampler(window=1000, seed=3, constant_liar=liar, n_startup_trials=5),
    ):
        study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
        study.optimize(_objective, n_trials=40)
        proposals.append([t.params for t in study.trials])
    assert proposals[0] == proposals[1]


def test_each_trial_splits_the_trials_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """TPE's split into good and bad trials (a non-dominated sort of the window) is made once
    per trial, not once per parameter."""
    from optuna.samplers._tpe import sampler as tpe

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    calls: list[int] = []
    real = tpe._split_trials

    def counting(*args: object) -> object:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(tpe, "_split_trials", counting)
    sampler = WindowedTPESampler(seed=0, constant_liar=True, n_startup_trials=5)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    study.optimize(_objective, n_trials=12)
    assert len(calls) == 12 - 5  # one per trial after the random startup, for 3-4 parameters
