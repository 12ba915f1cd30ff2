"""The study's figures and notes, written in one transaction each, read as optuna-dashboard
reads them; the Pareto front taken from the trials in hand, as ``study.best_trials``."""

from __future__ import annotations

from pathlib import Path

import optuna
import plotly.graph_objects as go
import plotly.io
import pytest
from optuna_dashboard import get_note, save_plotly_graph_object
from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

from tauopt.storage import StorageSettings, open_storage
from tauopt.study._figures import save_figure, write_trial_note
from tauopt.study._views import front_numbers


def _study(path: Path, name: str = "s") -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(StorageSettings(url=f"sqlite:///{path}"))
    return optuna.create_study(study_name=name, storage=storage, directions=["maximize"] * 2)


def _attrs(study: optuna.Study) -> dict[str, object]:
    return study._storage.get_study_system_attrs(study._study_id)


def _scatter(points: int) -> go.Figure:
    return go.Figure(go.Scatter(x=list(range(points)), y=[p * 0.5 for p in range(points)]))


def test_a_figure_is_saved_as_optuna_dashboard_saves_it(tmp_path: Path) -> None:
    ours, theirs = _study(tmp_path / "a.db"), _study(tmp_path / "b.db")
    for points in (3000, 40):  # a long figure, then a shorter one over it
        save_figure(ours, _scatter(points), "fig")
        save_plotly_graph_object(theirs, _scatter(points), graph_object_id="fig")
        assert _attrs(ours) == _attrs(theirs)
    shown = get_plotly_graph_objects(_attrs(ours))["fig"]
    assert plotly.io.from_json(shown).data[0].x == tuple(range(40))  # the old chunks are emptied


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask() outside optimize()
def test_a_note_is_written_once_and_read_by_the_dashboard(tmp_path: Path) -> None:
    study = _study(tmp_path / "n.db")
    trial = study.ask()
    body = "## trial\n" + "x" * 5000  # several chunks
    write_trial_note(trial, body)
    assert get_note(trial) == body
    other = study.ask()
    write_trial_note(other, "short")
    assert get_note(other) == "short" and get_note(trial) == body


@pytest.mark.parametrize("constrained", [False, True])
def test_the_front_is_the_studys_best_trials(tmp_path: Path, constrained: bool) -> None:
    study = _study(tmp_path / "f.db")
    dists = {"x": optuna.distributions.FloatDistribution(0, 1)}
    values = [(0.9, 1.0), (0.8, 2.0), (0.9, 1.0), (0.5, 3.0), (0.95, 0.5), (0.1, 0.1), (0.7, 2.5)]
    for i, v in enumerate(values):
        attrs = {"constraints": [0.1 if i == 4 else -0.1]} if constrained else {}
        study.add_trial(
            optuna.trial.create_trial(
                params={"x": 0.1}, distributions=dists, values=list(v), system_attrs=attrs
            )
        )
    want = {t.number for t in study.best_trials}
    assert front_numbers(study) == want
    assert (4 in want) is not constrained  # the infeasible best trial counts only unconstrained
