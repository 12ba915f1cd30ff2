"""The contract with Optuna's and optuna-dashboard's private API (``tauopt.storage._optuna``):
each helper gives what the public API gives, and a mismatch of versions or names stops at
once with one line. These tests import no torch: CI runs them in small environments at the
lowest and the highest supported version of each library (``.ci/contract``)."""

from __future__ import annotations

import datetime
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import plotly.graph_objects as go
import plotly.io
import pytest
import sqlalchemy
from optuna.trial import TrialState
from optuna_dashboard import get_note, save_plotly_graph_object
from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

from tauopt.errors import DependencyError
from tauopt.storage import (
    StorageSettings,
    _optuna,
    figure_attrs,
    first_note_attrs,
    open_storage,
    pareto_front,
    rdb_of,
    running_trials,
    set_study_system_attrs,
    set_trial_attrs,
    stale_trial_ids,
    storage_of,
    study_id,
    trial_counts,
    trial_id,
    with_heartbeat,
)
from tauopt.storage._optuna import WindowedTPESampler, _RecentTrials

pytestmark = pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask() outside optimize()


def test_the_installed_versions_pass_the_check() -> None:
    _optuna.check()


@pytest.mark.parametrize(
    ("owner", "name"),
    [
        ("optuna.samplers._tpe.sampler", "_split_trials"),
        ("optuna.storages._rdb.storage", "_create_scoped_session"),
        ("optuna_dashboard._note", "note_ver_key"),
    ],
)
def test_a_missing_name_stops_with_one_line_naming_the_versions(
    monkeypatch: pytest.MonkeyPatch, owner: str, name: str
) -> None:
    import importlib

    monkeypatch.delattr(importlib.import_module(owner), name)
    with pytest.raises(DependencyError) as info:
        _optuna.check()
    message = str(info.value)
    assert "\n" not in message and name in message
    assert "optuna >=" in message and "optuna-dashboard >=" in message


def test_a_changed_arity_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    from optuna.samplers._tpe import sampler as tpe

    real = tpe._split_trials
    monkeypatch.setattr(
        tpe, "_split_trials", lambda study, trials, n, constrained: real(study, trials, n)
    )
    with pytest.raises(DependencyError, match="takes 4 arguments, not 3"):
        _optuna.check()


def test_an_unsupported_version_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    real = _optuna.importlib.metadata.version
    monkeypatch.setattr(
        _optuna.importlib.metadata, "version", lambda n: "6.1.0" if n == "optuna" else real(n)
    )
    with pytest.raises(DependencyError, match=r"optuna 6\.1\.0 is not supported"):
        _optuna.check()


# -- attributes, counts and heartbeats: as the public API has them --------------------------


def test_many_attributes_in_one_transaction_are_optunas_own(tmp_path: Path) -> None:
    study = _study(tmp_path / "t.db")
    trial = study.ask()
    rdb = rdb_of(storage_of(study))
    set_trial_attrs(rdb, trial_id(trial), user={"a": [1, 2], "b": "x"}, system={"c": 0.5})
    trial.set_constraint("floor", -0.25)  # the public way to one constraint
    set_trial_attrs(rdb, trial_id(trial), system={_optuna.constraint_key("other"): 0.75})
    stored = rdb.get_trial(trial_id(trial))
    assert stored.user_attrs == {"a": [1, 2], "b": "x"}
    assert stored.system_attrs["c"] == 0.5
    assert stored.constraints == {"floor": -0.25, "other": 0.75}


@pytest.fixture(params=["sqlite", "postgresql"])
def rdb(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[optuna.storages.RDBStorage]:
    """An empty RDB storage on SQLite, or on a PostgreSQL database of its own (the server of
    ``TAUOPT_TEST_POSTGRES``, as in conftest.py, which these environments do not load)."""
    if request.param == "sqlite":
        yield optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'r.db'}")
        return
    server = os.environ.get(
        "TAUOPT_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
    )
    name = f"tauopt_contract_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    url = sqlalchemy.engine.make_url(server).set(database=name)
    storage = optuna.storages.RDBStorage(url.render_as_string(hide_password=False))
    yield storage
    storage.engine.dispose()
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_many_attributes_at_once_replace_and_refuse_as_optunas_own(
    rdb: optuna.storages.RDBStorage,
) -> None:
    """One upsert statement per kind: new keys added, existing ones replaced, as Optuna's one
    attribute at a time does on the same database; a finished trial refuses and keeps what it
    had, an unknown one is missing."""
    sid = rdb.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "s")
    ours, theirs = rdb.create_new_trial(sid), rdb.create_new_trial(sid)
    first = {"a": 1, "b": [1, 2], "c": {"x": "y"}}
    second = {"b": [3], "d": None, "e": "ü"}
    for user, system in ((first, {"s": 0.5}), (second, {"s": 0.75, "t": True})):
        set_trial_attrs(rdb, ours, user=user, system=system)
        for key, value in user.items():
            rdb.set_trial_user_attr(theirs, key, value)
        for key, value in system.items():
            rdb.set_trial_system_attr(theirs, key, value)
    got, want = rdb.get_trial(ours), rdb.get_trial(theirs)
    assert got.user_attrs == want.user_attrs == first | second
    assert got.system_attrs == want.system_attrs == {"s": 0.75, "t": True}
    rdb.set_trial_state_values(ours, TrialState.COMPLETE, [0.5])
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        set_trial_attrs(rdb, ours, user={"a": 2, "z": 0})
    assert rdb.get_trial(ours).user_attrs == first | second
    with pytest.raises(KeyError):
        set_trial_attrs(rdb, theirs + 100, user={"a": 2})


def test_without_an_upsert_the_attributes_and_stamps_go_through_optunas_public_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database without an upsert (here SQLite older than 3.24, as the module sees it) gets
    the same attributes and stamps, one public call each, and the same refusals."""
    monkeypatch.setattr(_optuna.sqlite3, "sqlite_version_info", (3, 23, 0))
    rdb = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'old.db'}")
    sid = rdb.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "s")
    running, done = rdb.create_new_trial(sid), rdb.create_new_trial(sid)
    assert _optuna._upsert("sqlite", _optuna._models.TrialUserAttributeModel, []) is None
    set_trial_attrs(rdb, running, user={"a": 1, "b": [2]}, system={"s": 0.5})
    set_trial_attrs(rdb, running, user={"b": [3]})
    rdb.set_trial_state_values(done, TrialState.COMPLETE, [0.5])
    before = time.time()
    _optuna.stamp_running(rdb, [running, done], "beat")
    got = rdb.get_trial(running)
    assert got.user_attrs == {"a": 1, "b": [3]}
    assert got.system_attrs["s"] == 0.5 and before <= got.system_attrs["beat"] <= time.time()
    assert "beat" not in rdb.get_trial(done).system_attrs
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        set_trial_attrs(rdb, done, user={"a": 2})
    rdb.engine.dispose()


def test_a_heartbeat_stamps_only_running_trials_with_the_database_hosts_clock(
    rdb: optuna.storages.RDBStorage,
) -> None:
    sid = rdb.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "s")
    running, done, waiting = (rdb.create_new_trial(sid) for _ in range(3))
    rdb.set_trial_state_values(done, TrialState.COMPLETE, [0.5])
    rdb.set_trial_state_values(waiting, TrialState.WAITING)
    rdb.set_trial_system_attr(running, "beat", 1.0)
    before = time.time()
    _optuna.stamp_running(rdb, [running, done, waiting, waiting + 100], "beat")
    stamp = rdb.get_trial(running).system_attrs["beat"]
    assert before <= stamp <= time.time()
    assert "beat" not in rdb.get_trial(done).system_attrs
    assert "beat" not in rdb.get_trial(waiting).system_attrs
    _optuna.stamp_running(rdb, [], "beat")  # nothing to stamp: no statement


def test_counts_running_trials_and_heartbeats_agree_with_the_public_api(tmp_path: Path) -> None:
    storage = open_storage(
        StorageSettings(url=f"sqlite:///{tmp_path / 'h.db'}", heartbeat_interval=1, grace_period=2)
    )
    study = optuna.create_study(study_name="h", storage=storage)
    rdb = rdb_of(storage)
    beating, silent, never = study.ask(), study.ask(), study.ask()
    done = study.ask()
    done.set_user_attr("why", "x")
    study.tell(done, state=TrialState.FAIL)
    study.tell(study.ask(), 1.0)
    rdb.record_heartbeat(trial_id(beating))
    rdb.record_heartbeat(trial_id(silent))
    counts, marked = trial_counts(rdb, study_id(study), failed_with_attr="why")
    public = {s.name: len(study.get_trials(states=(s,))) for s in TrialState}
    assert counts == {k: v for k, v in public.items() if v} and marked == 1
    running = running_trials(rdb, study_id(study))
    assert {n for n, _ in running.values()} == {0, 1, 2}
    assert all(isinstance(start, datetime.datetime) for _, start in running.values())
    ids = [trial_id(t) for t in (beating, silent, never)]
    assert with_heartbeat(rdb, ids) == set(ids[:2])
    time.sleep(3.2)  # SQLite keeps whole seconds: past the grace period whatever the rounding
    rdb.record_heartbeat(trial_id(beating))
    assert stale_trial_ids(rdb, study_id(study)) == [trial_id(silent)]


def _study(path: Path, name: str = "s") -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(StorageSettings(url=f"sqlite:///{path}"))
    return optuna.create_study(study_name=name, storage=storage, directions=["maximize"] * 2)


def _attrs(study: optuna.Study) -> dict[str, object]:
    return storage_of(study).get_study_system_attrs(study_id(study))


def _save_figure(study: optuna.Study, figure: go.Figure, figure_id: str) -> None:
    chunks, prefix = figure_attrs(figure.to_json(), figure_id)
    set_study_system_attrs(rdb_of(storage_of(study)), study_id(study), chunks, clear_prefix=prefix)


def _write_note(trial: optuna.Trial, body: str) -> None:
    attrs = first_note_attrs(body, trial_id(trial))
    set_study_system_attrs(rdb_of(trial.storage), study_id(trial.study), attrs)


def _scatter(points: int) -> go.Figure:
    return go.Figure(go.Scatter(x=list(range(points)), y=[p * 0.5 for p in range(points)]))


def test_a_figure_is_saved_as_optuna_dashboard_saves_it(tmp_path: Path) -> None:
    ours, theirs = _study(tmp_path / "a.db"), _study(tmp_path / "b.db")
    for points in (3000, 40):  # a long figure, then a shorter one over it
        _save_figure(ours, _scatter(points), "fig")
        save_plotly_graph_object(theirs, _scatter(points), graph_object_id="fig")
        assert _attrs(ours) == _attrs(theirs)
    shown = get_plotly_graph_objects(_attrs(ours))["fig"]
    assert plotly.io.from_json(shown).data[0].x == tuple(range(40))  # the old chunks are emptied


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask() outside optimize()
def test_a_note_is_written_once_and_read_by_the_dashboard(tmp_path: Path) -> None:
    study = _study(tmp_path / "n.db")
    trial = study.ask()
    body = "## trial\n" + "x" * 5000  # several chunks
    _write_note(trial, body)
    assert get_note(trial) == body
    other = study.ask()
    _write_note(other, "short")
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
    assert {t.number for t in pareto_front(study.trials, study.directions)} == want
    assert (4 in want) is not constrained  # the infeasible best trial counts only unconstrained


# -- TPE on a window of the study ----------------------------------------------------------


def _tpe_study(n_finished: int, window: int) -> optuna.Study:
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
    study = _tpe_study(20, window=5)
    running = study.ask()
    view = _RecentTrials(study, 5)
    seen = view._get_trials(deepcopy=False, states=None)
    finished = [t.number for t in seen if t.state.is_finished()]
    assert finished == [15, 16, 17, 18, 19]
    assert [t.number for t in seen if t.state == TrialState.RUNNING] == [running.number]
    assert view.directions == study.directions  # everything else is the study's


def test_suggestions_come_from_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """The good trials (x near 0) are all older than the window: TPE no longer knows them."""
    study = _tpe_study(60, window=10)
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


def test_new_enqueued_and_retried_trials_are_told_apart() -> None:
    """The system attributes behind ``is_new`` and ``RETRIED_FROM``: what ``enqueue_trial``
    and ``RetryHeartbeatStaleTrialCallback`` write."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    fresh = study.ask()
    study.enqueue_trial({"x": 0.5})
    queued = study.ask()
    queued.suggest_float("x", 0, 1)
    study.tell(queued, state=TrialState.FAIL)
    with pytest.warns(optuna.exceptions.ExperimentalWarning):
        callback = optuna.storages.RetryHeartbeatStaleTrialCallback()
    callback(study, study.trials[queued.number])
    retry = study.ask()
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert _optuna.is_new(by_number[fresh.number])
    assert not _optuna.is_new(by_number[queued.number])
    assert not _optuna.is_new(by_number[retry.number])
    assert by_number[retry.number].system_attrs[_optuna.RETRIED_FROM] == queued.number
    assert retry.params == {"x": 0.5}


def test_a_trial_as_claimed_is_optunas_read_of_it(tmp_path: Path) -> None:
    """``as_claimed`` is the trial as the storage holds it when it is taken (a retry's
    attributes and its origin included), without a read: the worker plans a trial from it."""
    from tauopt.storage import RETRIED_FROM, as_claimed, take_waiting

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'db.sqlite'}")
    retry = optuna.trial.create_trial(
        state=TrialState.WAITING,
        params={"x": 0.5},
        distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
        user_attrs={"run_key": "k1"},
        system_attrs={RETRIED_FROM: 0},
    )
    study.add_trial(retry)
    waiting = study.get_trials(states=(TrialState.WAITING,))[0]
    taken = take_waiting(study, waiting._trial_id)
    fresh = study.ask()
    for trial in (taken, fresh):
        assert trial is not None
        seen = as_claimed(trial)
        stored = study._storage.get_trial(trial._trial_id)
        assert seen is not None
        assert (seen.user_attrs, seen.system_attrs, seen.number, seen.state) == (
            stored.user_attrs,
            stored.system_attrs,
            stored.number,
            stored.state,
        )
    assert as_claimed(taken).system_attrs[RETRIED_FROM] == 0  # type: ignore[union-attr]
