"""``tauopt proxy``'s own calls (``tauopt.storage._service``): many attributes in one call (a
trial's record, a study's figure chunks) with Optuna's semantics (a finished trial refuses,
an unknown one is missing), and a claim's questions (dead trials, counts, past the budget)
answered in SQL without reading the trials through Optuna's service. A proxy without them
(Optuna's own) gets Optuna's calls, with the same answers. Both proxies run in this process
on a SQLite database."""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from conftest import free_port
from optuna.study import StudyDirection
from optuna.trial import TrialState

from tauopt.storage import _optuna, _proxy, _service
from tauopt.storage._access import DirectAccess, ProxyAccess
from tauopt.storage._retry import is_transient

USER = {f"record_{i}": [i, i / 3, f"v{i}"] for i in range(25)}
SYSTEM = {"tauopt:heartbeat": 1.5, "tauopt:member": {"k": 4}}


def _plain(rdb: optuna.storages.RDBStorage, port: int) -> Any:
    """Optuna's proxy service alone on a server of its own, as ``run_grpc_proxy_server`` makes
    it (ten threads, no interceptors)."""
    server = _optuna.proxy_server_with(rdb, threads=10, interceptors=[], options=[])
    server.add_insecure_port(f"127.0.0.1:{port}")
    return server


class Served:
    """A SQLite database, a proxy on it (tauopt's, or Optuna's without the batched calls) and a
    client of that proxy."""

    def __init__(self, tmp_path: Path, *, batched: bool) -> None:
        self.rdb = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'db.sqlite'}")
        port = free_port()
        self.server = (
            _proxy.proxy_server(self.rdb, "127.0.0.1", port) if batched else _plain(self.rdb, port)
        )
        self.server.start()
        self.client = _proxy.open_proxy(f"grpc://127.0.0.1:{port}")
        self.access = ProxyAccess(self.client, max_retry=1)
        self.study_id = self.client.create_new_study([StudyDirection.MAXIMIZE], "s")

    def close(self) -> None:
        self.client.close()
        self.server.stop(None)


@pytest.fixture(params=[True, False], ids=["tauopt-proxy", "optuna-proxy"])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path, batched=request.param)
    yield s
    s.close()


@pytest.fixture()
def batched(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path, batched=True)
    yield s
    s.close()


def _no_single_calls(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any) -> None:
        raise AssertionError("one call per attribute, where the proxy batches")

    for name in ("set_trial_user_attr", "set_trial_system_attr", "set_study_system_attr"):
        monkeypatch.setattr(client, name, refuse)


def test_a_trials_record_is_written_whole(
    served: Served, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    batched = request.node.callspec.params["served"]
    trial_id = served.client.create_new_trial(served.study_id)
    if batched:
        _no_single_calls(served.client, monkeypatch)
    served.access.set_trial_attrs(trial_id, user=USER, system=SYSTEM)
    trial = served.rdb.get_trial(trial_id)
    assert {k: tuple(v) for k, v in trial.user_attrs.items()} == {
        k: tuple(v) for k, v in USER.items()
    }
    assert trial.system_attrs == SYSTEM
    assert served.client.service.offered is batched


def test_a_finished_trial_refuses_and_an_unknown_one_is_missing(served: Served) -> None:
    trial_id = served.client.create_new_trial(served.study_id)
    served.client.set_trial_state_values(trial_id, TrialState.COMPLETE, [0.5])
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        served.access.set_trial_attrs(trial_id, user=USER, system={})
    assert served.rdb.get_trial(trial_id).user_attrs == {}
    with pytest.raises(KeyError):
        served.access.set_trial_attrs(trial_id + 100, user=USER, system={})


def test_a_figure_in_many_requests_clears_only_what_it_no_longer_fills(
    served: Served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks of 200 characters in requests of 1,000 bytes: the new figure is written in
    several calls, the old chunks it no longer fills are emptied, other attributes stay; the
    same as the one transaction of a direct database."""
    monkeypatch.setattr(_service, "MAX_REQUEST_BYTES", 1000)
    old = {f"fig:{i}": "o" * 200 for i in range(12)} | {"other": 1, "fig2:0": "x"}
    new = {f"fig:{i}": f"{i}" * 200 for i in range(7)}
    direct = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'direct.sqlite'}")
    direct_id = direct.create_new_study([StudyDirection.MAXIMIZE], "s")
    for study_id, access in (
        (served.study_id, served.access),
        (direct_id, DirectAccess(direct)),
    ):
        access.set_study_system_attrs(study_id, old)
        access.set_study_system_attrs(study_id, new, clear_prefix="fig:")
    got = served.rdb.get_study_system_attrs(served.study_id)
    assert got == direct.get_study_system_attrs(direct_id)
    assert got == new | {f"fig:{i}": "" for i in range(7, 12)} | {"other": 1, "fig2:0": "x"}


def test_a_database_failure_behind_the_proxy_is_worth_a_retry(
    batched: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The proxy's own connection failing is UNAVAILABLE to the worker, which waits for it
    (a lasting failure of the request stays lasting)."""
    trial_id = batched.client.create_new_trial(batched.study_id)

    def cut(*args: Any, **kwargs: Any) -> None:
        import sqlalchemy.exc

        raise optuna.exceptions.StorageInternalError("write failed") from (
            sqlalchemy.exc.OperationalError("UPDATE", {}, Exception("server closed the connection"))
        )

    monkeypatch.setattr(_optuna, "set_trial_attrs", cut)
    with pytest.raises(Exception) as failed:
        batched.access.set_trial_attrs(trial_id, user=USER, system={})
    assert is_transient(failed.value), failed.value
    assert "server closed the connection" in str(failed.value)


def _no_trial_reads(served: Served, batched: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the proxy answers in SQL, the worker reads no trials through Optuna's service."""
    if batched:

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("every unfinished trial read, where the proxy answers in SQL")

        monkeypatch.setattr(served.client, "get_all_trials", refuse)


def test_dead_trials_are_found_alike(
    served: Served, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Of four running trials: one beat now, one 100 s ago, one never beat but started now,
    one never beat and started 100 s ago. With a grace of 30 s, the second and the last are
    dead."""
    ids = [served.client.create_new_trial(served.study_id) for _ in range(4)]
    served.access.beat([ids[0]])
    served.client.set_trial_system_attr(ids[1], _service.HEARTBEAT_ATTR, time.time() - 100)
    old = datetime.datetime.now() - datetime.timedelta(seconds=100)
    with served.rdb.engine.begin() as conn:
        conn.execute(
            sqlalchemy.text("UPDATE trials SET datetime_start = :t WHERE trial_id = :i"),
            {"t": old, "i": ids[3]},
        )
    _no_trial_reads(served, request.node.callspec.params["served"], monkeypatch)
    assert served.access.dead_trials(served.study_id, 30.0) == {
        ids[1]: (1, "its heartbeat went silent"),
        ids[3]: (3, "never sent a heartbeat"),
    }


def test_heartbeats_are_one_call_and_skip_a_finished_trial(
    served: Served, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tauopt proxy stamps a worker's trials in one call (no per-attribute call of
    Optuna's); a trial that finished meanwhile is left alone on both proxies, with no
    error."""
    running, done = (served.client.create_new_trial(served.study_id) for _ in range(2))
    served.client.set_trial_state_values(done, TrialState.COMPLETE, [0.5])
    if request.node.callspec.params["served"]:
        _no_single_calls(served.client, monkeypatch)
    before = time.time()
    served.access.beat([running, done])
    assert before <= served.rdb.get_trial(running).system_attrs[_service.HEARTBEAT_ATTR]
    assert _service.HEARTBEAT_ATTR not in served.rdb.get_trial(done).system_attrs
    assert served.access.dead_trials(served.study_id, 30.0) == {}


def _trials_of_every_kind(served: Served) -> list[int]:
    """#0 complete, #1 failed past the budget (uses none), #2 failed by its own fault (uses
    one), #3 failed through no fault (uses none), #4 running, #5 waiting."""
    client, sid = served.client, served.study_id
    ids = [client.create_new_trial(sid) for _ in range(5)]
    client.set_trial_state_values(ids[0], TrialState.COMPLETE, [0.5])
    client.set_trial_user_attr(ids[1], _service.OVER_BUDGET_ATTR, True)
    client.set_trial_user_attr(ids[2], "fail_reason", "diverged")
    for tid in ids[1:4]:
        client.set_trial_state_values(tid, TrialState.FAIL)
    template = optuna.trial.create_trial(state=TrialState.WAITING)
    ids.append(client.create_new_trial(sid, template_trial=template))
    return ids


def test_counts_are_alike(
    served: Served, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    _trials_of_every_kind(served)
    _no_trial_reads(served, request.node.callspec.params["served"], monkeypatch)
    counts = served.access.counts(served.study_id, failed_with_attr="fail_reason")
    assert counts == ({"COMPLETE": 1, "FAIL": 3, "RUNNING": 1, "WAITING": 1}, 1)


def test_a_new_trial_past_the_budget_is_found_alike(
    served: Served, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before the new trial #6, four trials use the budget (#0, #2, #4, #5): with a budget of
    4 it comes past it, with 5 not; an enqueued trial never does (it was counted before)."""
    _trials_of_every_kind(served)
    new = served.client.create_new_trial(served.study_id)
    enqueued = served.client.create_new_trial(
        served.study_id,
        template_trial=optuna.trial.create_trial(
            state=TrialState.RUNNING, system_attrs={"fixed_params": {}}
        ),
    )
    _no_trial_reads(served, request.node.callspec.params["served"], monkeypatch)
    past = [
        served.access.past_budget(served.study_id, trial, n, failed_with_attr="fail_reason")
        for trial, n in ((new, 4), (new, 5), (enqueued, 1))
    ]
    direct = DirectAccess(served.rdb)
    assert past == [True, False, False]
    assert direct.past_budget(served.study_id, new, 4, failed_with_attr="fail_reason")


def test_the_waiting_trials_are_found_alike(
    served: Served, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ask()`` first looks for a waiting trial; the tauopt proxy names them in SQL instead of
    sending every unfinished trial, and ``ask()`` pops the same one."""
    ids = _trials_of_every_kind(served)
    if request.node.callspec.params["served"]:

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("every unfinished trial read for the waiting ones")

        monkeypatch.setattr(optuna.storages.GrpcStorageProxy, "get_all_trials", refuse)
    waiting = served.client.get_all_trials(served.study_id, states=(TrialState.WAITING,))
    assert [(t.number, t.state) for t in waiting] == [(5, TrialState.WAITING)]
    monkeypatch.undo()
    trial = optuna.load_study(study_name="s", storage=served.client).ask()
    assert trial.number == 5 and served.rdb.get_trial(ids[5]).state == TrialState.RUNNING


def test_a_call_that_never_answers_ends_and_the_next_goes_on_a_new_connection(
    batched: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request in flight when the network went away may never be answered: the call ends at
    its deadline as a passing failure (the worker calls again) on a fresh connection."""
    trial_id = batched.client.create_new_trial(batched.study_id)
    monkeypatch.setattr(_service, "CALL_SECONDS", 0.5)
    write = _optuna.set_trial_attrs
    hang = [True]

    def stuck(*args: Any, **kwargs: Any) -> None:
        if hang.pop():
            time.sleep(2.0)
        write(*args, **kwargs)

    monkeypatch.setattr(_optuna, "set_trial_attrs", stuck)
    channel = batched.client.service._channel
    with pytest.raises(Exception) as failed:
        batched.access.set_trial_attrs(trial_id, user=USER, system={})
    assert is_transient(failed.value), failed.value
    assert batched.client.service._channel is not channel
    hang.append(False)
    batched.access.set_trial_attrs(trial_id, user=USER, system={})
    assert set(batched.rdb.get_trial(trial_id).user_attrs) == set(USER)


def test_the_proxy_counts_its_calls_per_method(batched: Served) -> None:
    before = batched.client.service.stats()
    assert before is not None
    trial_id = batched.client.create_new_trial(batched.study_id)
    for _ in range(3):
        batched.access.beat([trial_id])
    after = batched.client.service.stats()
    assert after is not None
    beats = after["methods"]["Beat"]["calls"] - before["methods"].get("Beat", {}).get("calls", 0)
    assert beats == 3
    assert after["methods"]["CreateNewTrial"]["calls"] >= 1
    assert after["methods"]["Beat"]["cpu_seconds"] > 0


def _mixed_study(served: Served) -> optuna.Study:
    """Through the proxy: 24 trials of three kinds of parameter (a float on a log scale, an
    integer, a category), complete, pruned (with intermediate values), failed, running (one
    with its parameters half drawn) and waiting."""
    study = optuna.load_study(study_name="s", storage=served.client)
    rng = __import__("random").Random(7)
    dists = {
        "lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True),
        "depth": optuna.distributions.IntDistribution(1, 8),
        "arch": optuna.distributions.CategoricalDistribution(["resnet", "fractional"]),
    }
    kinds = ["complete"] * 14 + ["pruned"] * 3 + ["fail"] * 2 + ["running"] * 3 + ["waiting"]
    rng.shuffle(kinds)
    for kind in kinds:
        params = {
            "lr": 10 ** rng.uniform(-4, 0),
            "depth": rng.randint(1, 8),
            "arch": rng.choice(["resnet", "fractional"]),
        }
        state = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED}.get(kind)
        state = state or {"fail": TrialState.FAIL, "running": TrialState.RUNNING}.get(kind)
        study.add_trial(
            optuna.trial.create_trial(
                state=state or TrialState.WAITING,
                params=params,
                distributions=dists,
                value=rng.random() if kind == "complete" else None,
                intermediate_values={s: rng.random() for s in range(rng.randint(1, 4))}
                if kind == "pruned"
                else None,
            )
        )
    half = served.client.create_new_trial(served.study_id)
    served.client.set_trial_param(half, "lr", 0.01, dists["lr"])
    return study


def test_a_sampler_behind_the_proxy_proposes_as_on_the_database(
    served: Served, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WindowedTPESampler's proposals through the proxy equal those of the same sampler on
    the database itself, within a window smaller than the study (trials cut off, unfinished
    ones kept). The tauopt proxy sends the trials TPE reads in one call of its own, and the
    worker reads no trial through Optuna's service; through Optuna's proxy the sampler reads
    through Optuna's calls."""
    study = _mixed_study(served)
    trial = study.ask()
    frozen = served.client.get_trial(_optuna.trial_id(trial))
    direct = optuna.load_study(study_name="s", storage=served.rdb)
    if request.node.callspec.params["served"]:

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("the sampler read every trial through Optuna's service")

        monkeypatch.setattr(served.client, "get_all_trials", refuse)
    space = {
        "lr": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True),
        "depth": optuna.distributions.IntDistribution(1, 8),
        "arch": optuna.distributions.CategoricalDistribution(["resnet", "fractional"]),
    }
    for window in (8, 1000):
        proposals = []
        for on in (study, direct):
            sampler = _optuna.WindowedTPESampler(
                window=window, seed=5, constant_liar=True, n_startup_trials=3
            )
            proposals.append(
                [sampler.sample_independent(on, frozen, n, d) for n, d in space.items()]
            )
        assert proposals[0] == proposals[1], window


def test_the_trials_sent_to_a_sampler_are_what_it_reads(batched: Served) -> None:
    """The trials of the proxy's reply equal the database's in what TPE reads of them (number,
    state, values, parameters and their distributions, a pruned trial's intermediate values),
    the latest finished ones of the window and every unfinished one; a running trial's
    parameters drawn since the last reply are in the next."""
    _mixed_study(batched)
    direct = batched.rdb.get_all_trials(batched.study_id)

    def seen(trials: list[Any]) -> list[tuple[Any, ...]]:
        return [
            (t.number, t.state, t.values, t.params, t.distributions, t.intermediate_values)
            for t in trials
        ]

    for window in (1, 5, 100):
        got = batched.client.recent_trials(batched.study_id, window)
        assert got is not None
        assert seen(got) == seen(_optuna.recent(direct, window))
        finished = [t for t in got if t.state.is_finished()]
        assert len(finished) == min(window, 19)
    # running, its parameters half drawn
    half = next(t for t in direct if t.state == TrialState.RUNNING and list(t.params) == ["lr"])
    batched.client.set_trial_param(
        _optuna.trial_id(half), "depth", 3, optuna.distributions.IntDistribution(1, 8)
    )
    got = batched.client.recent_trials(batched.study_id, 5)
    assert got is not None
    (now,) = [t for t in got if t.number == half.number]
    assert now.params == {"lr": 0.01, "depth": 3}


def test_a_shared_dead_trial_answer_drops_a_trial_failed_meanwhile(batched: Served) -> None:
    """Claims share the proxy's dead-trial answer for a moment; a trial that one worker has
    failed (and queued again) since is not named to the next."""
    client, sid = batched.client, batched.study_id
    tid = client.create_new_trial(sid)
    client.set_trial_system_attr(tid, _service.HEARTBEAT_ATTR, time.time() - 100)
    assert set(batched.access.dead_trials(sid, 60.0)) == {tid}
    client.set_trial_state_values(tid, TrialState.FAIL)
    assert batched.access.dead_trials(sid, 60.0) == {}


def test_the_studys_attributes_written_are_read_at_once(batched: Served) -> None:
    """The proxy reads a study's user attributes at most once a second for all claims; one
    written through it, or a budget set through its service, is read back at once."""
    client, sid = batched.client, batched.study_id
    client.set_study_user_attr(sid, "config", {"study": {"n_trials": 5}})
    assert client.get_study_user_attrs(sid)["config"] == {"study": {"n_trials": 5}}
    client.set_study_user_attr(sid, "config", {"study": {"n_trials": 6}})
    assert client.get_study_user_attrs(sid)["config"] == {"study": {"n_trials": 6}}
    used = client.service.set_budget(
        sid, "config", {"study": {"n_trials": 7}}, 7, failed_with_attr="fail_reason"
    )
    assert used == 0
    assert client.get_study_user_attrs(sid)["config"] == {"study": {"n_trials": 7}}


def test_a_trials_parameters_drawn_together_are_one_call(
    served: Served, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parameters a trial draws within ``params_together`` reach the database as it ends:
    through the tauopt proxy in one call (no call of Optuna's per parameter), through
    Optuna's proxy one call each; the trial reads its own meanwhile, as Optuna's does."""
    study = optuna.load_study(study_name="s", storage=served.client)
    trial = study.ask()
    tid = _optuna.trial_id(trial)
    if request.node.callspec.params["served"]:

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("a call per parameter, where the proxy takes them together")

        monkeypatch.setattr(served.client.__class__.__mro__[1], "set_trial_param", refuse)
    with served.access.params_together(tid):
        x = trial.suggest_float("x", 0.0, 1.0)
        n = trial.suggest_int("n", 1, 9)
        c = trial.suggest_categorical("c", ["a", "b"])
        assert trial.params == {"x": x, "n": n, "c": c}
        if request.node.callspec.params["served"]:
            assert served.rdb.get_trial(tid).params == {}
    assert served.rdb.get_trial(tid).params == {"x": x, "n": n, "c": c}
    monkeypatch.undo()
    study.tell(trial, 1.0)
    assert served.rdb.get_trial(tid).params == {"x": x, "n": n, "c": c}


def test_parameters_whose_sending_failed_are_sent_by_the_retry(
    batched: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A send lost to a database failure keeps the parameters: the drawing's retry (Optuna
    draws a parameter once, so it sets none) sends them; a distribution unlike the study's
    is refused for good, with Optuna's ValueError."""
    study = optuna.load_study(study_name="s", storage=batched.client)
    trial = study.ask()
    tid = _optuna.trial_id(trial)
    real = batched.client.service.set_trial_params
    failures = [ConnectionError("database away")]

    def flaky(*args: Any) -> None:
        if failures:
            raise failures.pop()
        real(*args)

    monkeypatch.setattr(batched.client.service, "set_trial_params", flaky)
    with pytest.raises(ConnectionError), batched.access.params_together(tid):
        x = trial.suggest_float("x", 0.0, 1.0)
    assert batched.rdb.get_trial(tid).params == {}
    with batched.access.params_together(tid):
        assert trial.suggest_float("x", 0.0, 1.0) == x  # drawn once
    assert batched.rdb.get_trial(tid).params == {"x": x}
    other = study.ask()
    with pytest.raises(ValueError), batched.access.params_together(_optuna.trial_id(other)):
        other.suggest_categorical("x", ["a", "b"])
    assert batched.rdb.get_trial(_optuna.trial_id(other)).params == {}


def test_a_claims_view_is_one_call_and_alike(
    served: Served, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim's first questions (dead trials, the budget as stored, counts, the queue) are
    one call of the tauopt proxy, with the answers Optuna's proxy gives question by
    question."""
    ids = _trials_of_every_kind(served)
    served.client.set_trial_system_attr(ids[4], _service.HEARTBEAT_ATTR, time.time() - 100)
    served.client.set_study_user_attr(served.study_id, "config", {"study": {"n_trials": 9}})
    if request.node.callspec.params["served"]:
        _no_trial_reads(served, True, monkeypatch)
        for name in ("dead_trials", "counts", "waiting_trial_ids"):
            monkeypatch.setattr(served.client.service, name, None)
        monkeypatch.setattr(served.client, "get_study_user_attrs", None)
    view = served.access.claim_view(
        served.study_id,
        30.0,
        failed_with_attr="fail_reason",
        budget_at=("config", "study", "n_trials"),
    )
    assert view.dead == {ids[4]: (4, "its heartbeat went silent")}
    assert view.budget == 9
    assert view.counts == {"COMPLETE": 1, "FAIL": 3, "RUNNING": 1, "WAITING": 1}
    assert view.own_failures == 1
    assert view.waiting == [ids[5]]


def test_a_claim_through_the_proxy_is_a_call_per_trial_and_stops_at_the_budget(
    served: Served, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's claim of five trials in a study of three: through the tauopt proxy one
    call reads the study (dead trials, budget, counts, queue) and one call makes each trial,
    with its first heartbeat and its budget check; through Optuna's proxy ``ask()``, a
    heartbeat and a check each. Either way three trials run, each stamped, and a trial that
    comes past the budget anyway (another proxy's claim) is failed, using none of it."""
    from tauopt.storage import RetryPolicy
    from tauopt.study._ledger import Ledger
    from tauopt.study._liveness import Heartbeat
    from tauopt.study._record import CONFIG_ATTR, FAIL_REASON_ATTR

    client, sid = served.client, served.study_id
    client.set_study_user_attr(sid, CONFIG_ATTR, {"study": {"n_trials": 3}})
    study = optuna.load_study(study_name="s", storage=client)
    said: list[str] = []
    ledger = Ledger(
        study,
        client,
        grace=60.0,
        retry=RetryPolicy(limit=5.0, first_wait=0.01, max_wait=0.01),
        heartbeat=Heartbeat(served.access, 60.0, said.append),
        say=said.append,
        access=served.access,
    )
    calls: list[str] = []
    real = client.service._call
    monkeypatch.setattr(client.service, "_call", lambda n, r: calls.append(n) or real(n, r))
    claims, _ = ledger.claim(5)
    assert [c.trial.number for c in claims] == [0, 1, 2]
    for claim in claims:
        stored = served.rdb.get_trial(_optuna.trial_id(claim.trial))
        assert stored.state == TrialState.RUNNING
        assert _service.HEARTBEAT_ATTR in stored.system_attrs
    if request.node.callspec.params["served"]:
        # (and a second look, for the two trials more it asked for)
        assert calls == ["ClaimView", "NewTrial", "NewTrial", "NewTrial", "ClaimView"]
        made = client.service.new_trial(
            sid, failed_with_attr=FAIL_REASON_ATTR, budget_at=(CONFIG_ATTR, "study", "n_trials")
        )
        assert made is not None and made.state == TrialState.FAIL
        past = served.rdb.get_trial(_optuna.trial_id(made))
        assert past.state == TrialState.FAIL and past.user_attrs[_service.OVER_BUDGET_ATTR]
    assert ledger.claim(1) == ([], True)  # the budget is used: nothing more
    states = [t.state for t in served.rdb.get_all_trials(sid)]
    assert states.count(TrialState.RUNNING) == 3


def test_a_new_trial_is_checked_against_the_budget_as_stored_now(batched: Served) -> None:
    """The proxy shares a study's attributes between claims for a second, but a new trial's
    budget check reads the budget afresh: lowered beside the proxy (by another proxy, or on
    the database), it holds at once."""
    from tauopt.study._record import CONFIG_ATTR, FAIL_REASON_ATTR

    client, sid = batched.client, batched.study_id
    at = (CONFIG_ATTR, "study", "n_trials")
    client.set_study_user_attr(sid, CONFIG_ATTR, {"study": {"n_trials": 5}})
    assert client.get_study_user_attrs(sid)[CONFIG_ATTR]["study"]["n_trials"] == 5
    batched.rdb.set_study_user_attr(sid, CONFIG_ATTR, {"study": {"n_trials": 1}})
    first = client.service.new_trial(sid, failed_with_attr=FAIL_REASON_ATTR, budget_at=at)
    second = client.service.new_trial(sid, failed_with_attr=FAIL_REASON_ATTR, budget_at=at)
    assert first is not None and first.state == TrialState.RUNNING
    assert second is not None and second.state == TrialState.FAIL


def test_a_parameter_unlike_one_written_beside_the_proxy_is_refused(batched: Served) -> None:
    """The first distribution of a name, written on the database before the proxy ever saw
    it, is the one a new parameter is checked against (Optuna's rule)."""
    direct = optuna.load_study(study_name="s", storage=batched.rdb)
    direct.add_trial(
        optuna.trial.create_trial(
            params={"x": 0.5},
            distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
            value=1.0,
        )
    )
    trial = optuna.load_study(study_name="s", storage=batched.client).ask()
    with pytest.raises(ValueError), batched.access.params_together(_optuna.trial_id(trial)):
        trial.suggest_categorical("x", ["a", "b"])
    with batched.access.params_together(_optuna.trial_id(trial)):
        y = trial.suggest_int("y", 0, 3)
    assert batched.rdb.get_trial(_optuna.trial_id(trial)).params == {"y": y}


def test_a_deleted_study_leaves_nothing_behind_in_the_proxy(batched: Served) -> None:
    """What the proxy keeps of a study (its parameters' first distributions, the sampler's
    encoded trials) goes with it: a study made after it (on SQLite, maybe under its id) draws
    a parameter of another kind under the same name, and its sampler sees its own trials."""
    client = batched.client
    first = optuna.load_study(study_name="s", storage=client)
    trial = first.ask()
    with batched.access.params_together(_optuna.trial_id(trial)):
        trial.suggest_float("x", 0.0, 1.0)
    first.tell(trial, 1.0)
    assert client.recent_trials(batched.study_id, 10) is not None
    client.delete_study(batched.study_id)
    again = optuna.create_study(study_name="s2", storage=client)
    trial = again.ask()
    with batched.access.params_together(_optuna.trial_id(trial)):
        trial.suggest_categorical("x", ["a", "b"])
    assert batched.rdb.get_trial(_optuna.trial_id(trial)).params["x"] in ("a", "b")
    got = client.recent_trials(_optuna.study_id(again), 10)
    assert got is not None and [t.params for t in got] == [{"x": trial.params["x"]}]
