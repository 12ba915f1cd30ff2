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
