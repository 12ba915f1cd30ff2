"""tauopt's own calls on the proxy's port, beside Optuna's storage service (:data:`SERVICE`).

* Many attributes of a trial, or many system attributes of a study, in one call and one
  transaction. Optuna's service sets one attribute per call, each in a transaction of its
  own: a finished trial's record is some 25 calls, a figure a hundred.
* A claim's questions answered in SQL by the proxy: the dead trials, the trials per state,
  whether a new trial came past the budget, and which trials wait (``ask()`` looks for one
  first). Through Optuna's service each is a read of every unfinished trial of the study,
  sent whole: with hundreds of workers, hundreds of trials for every question.

A client of a proxy without this service (Optuna's ``run_grpc_proxy_server``) falls back to
Optuna's calls (:attr:`ServiceClient.offered`). Requests and replies are JSON; a request
stays under :data:`MAX_REQUEST_BYTES` (gRPC's default limit is 4 MiB), more goes as several
calls. The service writes straight to the database behind the proxy: both Optuna's caches
(the proxy's and the client's) keep only finished trials, whose attributes no longer change.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grpc
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from tauopt.storage import _optuna as private
from tauopt.storage._callstats import CallStats
from tauopt.storage._recent import Decoder, Encoder
from tauopt.storage._rounds import GroupCommit, Recent

SERVICE = "tauopt.Storage"
MAX_REQUEST_BYTES = 1 << 20
#: Seconds a call may take before the worker gives up on it and calls again on a new
#: connection: a request in flight when the network went away may otherwise wait forever on a
#: connection that will never answer (gRPC's calls have no deadline by default). Every call is
#: safe to repeat: upserts and reads.
CALL_SECONDS = 60.0
_NAMES = (
    "SetTrialAttrs",
    "SetStudySystemAttrs",
    "DeadTrials",
    "Counts",
    "PastBudget",
    "SetBudget",
    "WaitingTrials",
    "Beat",
    "Stats",
    "RecentTrials",
    "SetTrialParams",
    "ClaimView",
    "NewTrial",
)
#: The longest a dead-trial answer is shared between claims (seconds).
DEAD_ANSWER_SECONDS = 2.0
#: The trial system attribute a worker behind the proxy stamps as its heartbeat (Unix time).
HEARTBEAT_ATTR = "tauopt:heartbeat"
#: A new trial that found the budget spent, failed by itself (it uses no budget).
OVER_BUDGET_ATTR = "tauopt:over_budget"
_Item = tuple[str, str, Any]  # (kind, key, value)


def _dumps(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


def _loads(data: bytes) -> dict[str, Any]:
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError("a request is a JSON object")
    return message


#: The gRPC metadata key that carries the proxy's shared secret with every call.
SECRET_KEY = "tauopt-secret"


class _Secret(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds the shared secret to every call of a channel."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = [*(details.metadata or ()), (SECRET_KEY, self.secret)]
        return continuation(details._replace(metadata=metadata), request)


def proxy_channel(target: str, secret: str | None) -> grpc.Channel:
    """A channel to the proxy at ``target`` (``host:port``, an IPv6 host in brackets) whose
    calls present ``secret``; replies of any size (a study's trials can be large)."""
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)])
    return channel if secret is None else grpc.intercept_channel(channel, _Secret(secret))


@contextlib.contextmanager
def _status(context: grpc.ServicerContext) -> Iterator[None]:
    """Optuna's errors as the status codes its own service uses (a database failure is the
    proxy's guard's to answer, :mod:`tauopt.storage._proxy`)."""
    try:
        yield
    except KeyError as e:
        context.abort(grpc.StatusCode.NOT_FOUND, str(e))
    except optuna.exceptions.UpdateFinishedTrialError as e:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
    except ValueError as e:  # a parameter's distribution unlike the study's (as Optuna's)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))


def dead_by_stamp(
    running: Iterable[tuple[int, int, float | None, float | None]], now: float, grace: float
) -> dict[int, tuple[int, str]]:
    """Of running trials (id, number, start, heartbeat stamp; Unix times), those dead: silent
    for ``grace`` seconds, or without a heartbeat since ``grace`` seconds after their start.
    Returns id -> (number, why)."""
    out = {}
    for tid, number, start, beat in running:
        if beat is None:
            if now - (now if start is None else start) > grace:
                out[tid] = (number, "never sent a heartbeat")
        elif now - float(beat) > grace:
            out[tid] = (number, "its heartbeat went silent")
    return out


#: Beyond any trial's number: the trials "before" it are all of them.
_EVERY = 2**62


def budget_in_sql(rdb: optuna.storages.RDBStorage, study_id: int, at: Sequence[str]) -> int:
    """The study's budget as stored now: its user attribute ``at[0]``, then the keys
    ``at[1:]`` within it (``tauopt create`` may lower or raise it while workers claim)."""
    value: Any = rdb.get_study_user_attrs(study_id)
    for key in at:
        value = value[key]
    return int(value)


def past_budget_in_sql(
    rdb: optuna.storages.RDBStorage,
    study_id: int,
    trial_id: int,
    n_trials: int,
    *,
    failed_with_attr: str,
    budget_at: Sequence[str] | None = None,
) -> bool:
    """Whether new trial ``trial_id`` came past the budget (the rule of
    :func:`tauopt.storage._access.over_budget`), counted in SQL; the budget is read from the
    study at ``budget_at`` where given, else ``n_trials``."""
    trial = rdb.get_trial(trial_id)
    if not private.is_new(trial):
        return False
    used = private.budget_before(
        rdb,
        study_id,
        trial.number,
        failed_with_attr=failed_with_attr,
        uncounted_attr=OVER_BUDGET_ATTR,
    )
    return used >= (n_trials if budget_at is None else budget_in_sql(rdb, study_id, budget_at))


def set_budget_in_sql(
    rdb: optuna.storages.RDBStorage,
    study_id: int,
    key: str,
    value: Any,
    n_trials: int,
    *,
    failed_with_attr: str,
) -> int:
    """Store ``value`` (which holds the budget ``n_trials``) as the study's user attribute
    ``key``, unless the study has used more trials than that; returns the trials used."""
    used = private.budget_before(
        rdb, study_id, _EVERY, failed_with_attr=failed_with_attr, uncounted_attr=OVER_BUDGET_ATTR
    )
    if n_trials >= used:
        rdb.set_study_user_attr(study_id, key, value)
    return used


class TauoptService:
    """The proxy's side, on the database behind it. A new trial's place in the budget and a
    change of the budget are decided under ``lock`` (the study's lock in the database, which
    direct workers' claims take too), one at a time in this process: a budget lowered while
    workers claim is then never overshot."""

    def __init__(
        self,
        rdb: optuna.storages.RDBStorage,
        lock: Callable[[optuna.storages.RDBStorage, str], contextlib.AbstractContextManager[None]],
        stats: CallStats | None = None,
        reader: optuna.storages.BaseStorage | None = None,
    ) -> None:
        self.rdb = rdb
        self._lock = lock
        self.stats = stats if stats is not None else CallStats()
        self._one_at_a_time = threading.Lock()
        # the samplers' trials are read where Optuna's service reads them (the proxy's cache)
        self._reader = reader if reader is not None else rdb
        self._encoder = Encoder()
        self._beats: GroupCommit[int] = GroupCommit(
            lambda ids: private.stamp_running(self.rdb, ids, HEARTBEAT_ATTR)
        )
        self._dead: Recent[dict[int, tuple[int, str]]] = Recent()
        self._dists: dict[int, dict[str, BaseDistribution]] = {}  # study -> name -> first
        if isinstance(reader, private.CoalescedCache):
            reader.on_delete.append(self._forget)

    def _forget(self, study_id: int) -> None:
        """What this service keeps of a deleted study (its id may come back on SQLite)."""
        self._dists.pop(study_id, None)
        self._encoder.forget(study_id)
        self._dead.forget()

    @contextlib.contextmanager
    def _study_locked(self, study_id: int) -> Iterator[None]:
        # one thread at a time: the others wait here without holding a database connection
        with self._one_at_a_time, self._lock(self.rdb, self.rdb.get_study_name_from_id(study_id)):
            yield

    def handler(self) -> grpc.GenericRpcHandler:
        calls = {
            "SetTrialAttrs": self._trial_attrs,
            "SetStudySystemAttrs": self._study_attrs,
            "DeadTrials": self._dead_trials,
            "Counts": self._counts,
            "PastBudget": self._past_budget,
            "SetBudget": self._set_budget,
            "WaitingTrials": self._waiting_trials,
            "Beat": self._beat,
            "Stats": self._stats,
            "SetTrialParams": self._trial_params,
            "ClaimView": self._claim_view,
            "NewTrial": self._new_trial,
        }
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._guarded(call), request_deserializer=_loads, response_serializer=_dumps
            )
            for name, call in calls.items()
        }
        # JSON already: the pieces of the reply are encoded once per change of a trial
        handlers["RecentTrials"] = grpc.unary_unary_rpc_method_handler(
            self._guarded(self._recent_trials), request_deserializer=_loads
        )
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    @staticmethod
    def _guarded(call: Any) -> Any:
        def handle(request: dict[str, Any], context: Any) -> dict[str, Any]:
            with _status(context):
                reply: dict[str, Any] = call(request)
            return reply

        return handle

    def _trial_attrs(self, request: dict[str, Any]) -> dict[str, Any]:
        private.set_trial_attrs(
            self.rdb, int(request["trial_id"]), user=request["user"], system=request["system"]
        )
        return {}

    def _trial_params(self, request: dict[str, Any]) -> dict[str, Any]:
        tid = int(request["trial_id"])
        params = [
            (str(name), float(value), optuna.distributions.json_to_distribution(dist))
            for name, value, dist in request["params"]
        ]
        # The study's first distribution of each name, which Optuna checks a new one against,
        # kept here as Optuna's cache keeps it: else a query over the study's parameters each.
        study_id, _, _ = private.trial_place(self.rdb, tid)
        known = self._dists.setdefault(study_id, {})
        missing = [name for name, _, _ in params if name not in known]
        if missing:
            known.update(private.param_distributions(self.rdb, study_id, missing))
        private.set_trial_params(self.rdb, tid, params, previous=known)
        for name, _, dist in params:
            known.setdefault(name, dist)
        return {}

    def _study_attrs(self, request: dict[str, Any]) -> dict[str, Any]:
        private.set_study_system_attrs(
            self.rdb,
            int(request["study_id"]),
            request["attrs"],
            clear_prefix=request.get("clear_prefix"),
            keep=frozenset(request.get("keep", ())),
        )
        return {}

    def _claim_view(self, request: dict[str, Any]) -> dict[str, Any]:
        """A claim's first questions in one call: the dead trials, the budget (the study's
        attributes as the proxy's cache shares them, read at most once a second), the counts
        and the waiting trials."""
        study_id = int(request["study_id"])
        dead = self._dead_trials(request)["dead"]
        attrs: Any = self._reader.get_study_user_attrs(study_id)
        for key in request["budget_at"]:
            attrs = attrs[str(key)]
        counts, own = private.trial_counts(
            self.rdb, study_id, failed_with_attr=request["failed_with_attr"]
        )
        waiting = private.waiting_trial_ids(self.rdb, study_id) if counts.get("WAITING") else []
        return {
            "dead": dead,
            "budget": int(attrs),
            "counts": counts,
            "own": own,
            "waiting": waiting,
        }

    def _new_trial(self, request: dict[str, Any]) -> dict[str, Any]:
        """A new trial made, stamped with its first heartbeat and checked against the budget
        as stored now, under the study's lock (as PastBudget checks it): one call where
        ``ask()``, the first heartbeat and the check were five. Past the budget, it is failed
        here (using none of it)."""
        study_id = int(request["study_id"])
        # through the proxy's cache, as Optuna's service makes a trial: the cache knows it
        tid = self._reader.create_new_trial(study_id)
        self._beats.add([tid])
        _, number, start = private.trial_place(self.rdb, tid)
        with self._study_locked(study_id):
            used = private.budget_before(
                self.rdb,
                study_id,
                number,
                failed_with_attr=request["failed_with_attr"],
                uncounted_attr=OVER_BUDGET_ATTR,
            )
            # read fresh, not from the cache: another proxy or `create` may have lowered it
            past = used >= budget_in_sql(self.rdb, study_id, request["budget_at"])
        if past:
            self.rdb.set_trial_user_attr(tid, OVER_BUDGET_ATTR, True)
            self.rdb.set_trial_state_values(tid, state=TrialState.FAIL)
        stamp = start.timestamp() if start else None
        return {"trial_id": tid, "number": number, "start": stamp, "past": past}

    def _dead_trials(self, request: dict[str, Any]) -> dict[str, Any]:
        study_id, grace = int(request["study_id"]), float(request["grace"])
        # Every claim asks, and a trial is dead only after tens of seconds: an answer is
        # shared for a thirtieth of the grace period (2 s at most). Those it names are read
        # again: a dead trial is failed by the first worker that finds it.
        dead = self._dead.get(
            (study_id, grace),
            min(DEAD_ANSWER_SECONDS, grace / 30),
            lambda: self._dead_now(study_id, grace),
        )
        if dead:
            still = private.running_trials(self.rdb, study_id)
            dead = {tid: why for tid, why in dead.items() if tid in still}
        return {"dead": [[tid, number, why] for tid, (number, why) in dead.items()]}

    def _dead_now(self, study_id: int, grace: float) -> dict[int, tuple[int, str]]:
        running = private.running_trials(self.rdb, study_id)
        beats = private.trial_system_attr(self.rdb, list(running), HEARTBEAT_ATTR)
        stamps = (
            (tid, number, start.timestamp() if start else None, beats.get(tid))
            for tid, (number, start) in running.items()
        )
        return dead_by_stamp(stamps, time.time(), grace)

    def _counts(self, request: dict[str, Any]) -> dict[str, Any]:
        counts, own = private.trial_counts(
            self.rdb, int(request["study_id"]), failed_with_attr=request["failed_with_attr"]
        )
        return {"counts": counts, "own": own}

    def _past_budget(self, request: dict[str, Any]) -> dict[str, Any]:
        study_id = int(request["study_id"])
        budget_at = request.get("budget_at")

        def past() -> bool:
            return past_budget_in_sql(
                self.rdb,
                study_id,
                int(request["trial_id"]),
                int(request["n_trials"]),
                failed_with_attr=request["failed_with_attr"],
                budget_at=[str(k) for k in budget_at] if budget_at else None,
            )

        if not budget_at:  # a client that passes the budget it read: no lock helps it
            return {"past": past()}
        with self._study_locked(study_id):
            return {"past": past()}

    def _set_budget(self, request: dict[str, Any]) -> dict[str, Any]:
        study_id = int(request["study_id"])
        with self._study_locked(study_id):
            used = set_budget_in_sql(
                self.rdb,
                study_id,
                str(request["key"]),
                request["value"],
                int(request["n_trials"]),
                failed_with_attr=request["failed_with_attr"],
            )
        if isinstance(self._reader, private.CoalescedCache):
            self._reader.forget_study_attrs()  # written beside it: claims read the new budget
        return {"used": used}

    def _waiting_trials(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"ids": private.waiting_trial_ids(self.rdb, int(request["study_id"]))}

    def _beat(self, request: dict[str, Any]) -> dict[str, Any]:
        # stamped with the beats of the other workers waiting now, in one statement
        self._beats.add(int(tid) for tid in request["trial_ids"])
        return {}

    def _recent_trials(self, request: dict[str, Any]) -> Any:
        study_id, window = int(request["study_id"]), max(1, int(request["window"]))
        trials = self._reader.get_all_trials(study_id, deepcopy=False)
        return self._encoder.reply(study_id, trials, window)

    def _stats(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"methods": self.stats.as_json(), "seconds": time.monotonic() - self.stats.started}


def _parts(items: list[_Item]) -> Iterator[list[_Item]]:
    """``items`` in requests of at most :data:`MAX_REQUEST_BYTES` (one larger item alone)."""
    part: list[_Item] = []
    size = 0
    for item in items:
        n = len(json.dumps(item[1:])) + 16
        if part and size + n > MAX_REQUEST_BYTES:
            yield part
            part, size = [], 0
        part.append(item)
        size += n
    if part:
        yield part


def _of(part: list[_Item], kind: str) -> dict[str, Any]:
    return {key: value for k, key, value in part if k == kind}


class ServiceClient:
    """A worker's side: the calls of the proxy at ``host:port``. Where the proxy offers none
    (:attr:`offered` turns False at the first UNIMPLEMENTED), the attribute calls fall back to
    one call per attribute of ``storage`` (the proxy's Optuna client), and the questions
    answer None (the caller asks Optuna's service)."""

    def __init__(
        self,
        storage: optuna.storages.BaseStorage,
        host: str,
        port: int,
        secret: str | None = None,
    ) -> None:
        self.storage = storage
        self.offered = True
        self._address = f"{host}:{port}"
        self._secret = secret
        self._decoder = Decoder()
        self._connect()

    def _connect(self) -> None:
        self._channel = proxy_channel(self._address, self._secret)
        self._calls = {
            name: self._channel.unary_unary(
                f"/{SERVICE}/{name}", request_serializer=_dumps, response_deserializer=_loads
            )
            for name in _NAMES
        }

    def close(self) -> None:
        self._channel.close()

    def _call(self, name: str, request: dict[str, Any]) -> dict[str, Any] | None:
        """The proxy's reply to ``request``; None where it offers no such calls."""
        if not self.offered:
            return None
        try:
            reply: dict[str, Any] = self._calls[name](request, timeout=CALL_SECONDS)
        except grpc.RpcError as e:
            code = e.code()  # the error of a call is also the call: code(), details()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                self._channel.close()  # the worker calls again (a passing failure), anew
                self._connect()
            if code == grpc.StatusCode.UNIMPLEMENTED:
                self.offered = False
                return None
            if code == grpc.StatusCode.NOT_FOUND:
                raise KeyError(e.details()) from e
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise optuna.exceptions.UpdateFinishedTrialError(e.details()) from e
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(e.details()) from e
            raise
        return reply

    def dead_trials(self, study_id: int, grace: float) -> dict[int, tuple[int, str]] | None:
        reply = self._call("DeadTrials", {"study_id": study_id, "grace": grace})
        if reply is None:
            return None
        return {int(tid): (int(number), str(why)) for tid, number, why in reply["dead"]}

    def counts(self, study_id: int, *, failed_with_attr: str) -> tuple[dict[str, int], int] | None:
        request = {"study_id": study_id, "failed_with_attr": failed_with_attr}
        reply = self._call("Counts", request)
        if reply is None:
            return None
        return {str(k): int(v) for k, v in reply["counts"].items()}, int(reply["own"])

    def past_budget(
        self,
        study_id: int,
        trial_id: int,
        n_trials: int,
        *,
        failed_with_attr: str,
        budget_at: Sequence[str] | None = None,
    ) -> bool | None:
        request: dict[str, Any] = {"study_id": study_id, "trial_id": trial_id}
        request |= {"n_trials": n_trials, "failed_with_attr": failed_with_attr}
        reply = self._call("PastBudget", {**request, "budget_at": list(budget_at or [])})
        return None if reply is None else bool(reply["past"])

    def set_budget(
        self, study_id: int, key: str, value: Any, n_trials: int, *, failed_with_attr: str
    ) -> int | None:
        """See :func:`set_budget_in_sql`; None where the proxy offers no such call."""
        request = {"study_id": study_id, "key": key, "value": value, "n_trials": n_trials}
        reply = self._call("SetBudget", {**request, "failed_with_attr": failed_with_attr})
        return None if reply is None else int(reply["used"])

    def beat(self, trial_ids: list[int]) -> bool:
        """Stamp the heartbeat of those of ``trial_ids`` that still run, with the proxy's
        clock (the one its dead-trial check reads); False where the proxy offers no service."""
        return self._call("Beat", {"trial_ids": trial_ids}) is not None

    def new_trial(
        self, study_id: int, *, failed_with_attr: str, budget_at: Sequence[str]
    ) -> FrozenTrial | None:
        """A new trial made, stamped and checked against the budget in one call (see
        ``TauoptService._new_trial``): the trial as made, or None where the proxy offers no
        such call. Past the budget, the trial comes back failed."""
        request = {"study_id": study_id, "failed_with_attr": failed_with_attr}
        reply = self._call("NewTrial", {**request, "budget_at": list(budget_at)})
        if reply is None:
            return None
        start = reply["start"]
        return FrozenTrial(
            number=int(reply["number"]),
            state=TrialState.FAIL if reply["past"] else TrialState.RUNNING,
            value=None,
            datetime_start=None if start is None else datetime.datetime.fromtimestamp(start),
            datetime_complete=None,
            params={},
            distributions={},
            user_attrs={OVER_BUDGET_ATTR: True} if reply["past"] else {},
            system_attrs={},
            intermediate_values={},
            trial_id=int(reply["trial_id"]),
        )

    def claim_view(
        self, study_id: int, grace: float, *, failed_with_attr: str, budget_at: Sequence[str]
    ) -> dict[str, Any] | None:
        """The fields of a :class:`~tauopt.storage._access.ClaimView`, in one call."""
        request = {"study_id": study_id, "grace": grace, "failed_with_attr": failed_with_attr}
        reply = self._call("ClaimView", {**request, "budget_at": list(budget_at)})
        if reply is None:
            return None
        return {
            "dead": {int(t): (int(n), str(why)) for t, n, why in reply["dead"]},
            "budget": int(reply["budget"]),
            "counts": {str(k): int(v) for k, v in reply["counts"].items()},
            "own_failures": int(reply["own"]),
            "waiting": [int(t) for t in reply["waiting"]],
        }

    def set_trial_params(
        self, trial_id: int, params: Sequence[tuple[str, float, BaseDistribution]]
    ) -> None:
        """Parameters (name, internal value, distribution) of a running trial in one call and
        one transaction; one call each where the proxy offers no such call."""
        rows = [
            [name, value, optuna.distributions.distribution_to_json(dist)]
            for name, value, dist in params
        ]
        if self._call("SetTrialParams", {"trial_id": trial_id, "params": rows}) is None:
            for name, value, dist in params:
                self.storage.set_trial_param(trial_id, name, value, dist)

    def recent_trials(self, study_id: int, window: int) -> list[FrozenTrial] | None:
        """The trials a sampler of ``window`` models (:func:`tauopt.storage._optuna.recent`),
        with what TPE reads of them alone (:mod:`tauopt.storage._recent`), by number."""
        reply = self._call("RecentTrials", {"study_id": study_id, "window": window})
        return None if reply is None else self._decoder.trials(reply)

    def stats(self) -> dict[str, Any] | None:
        """What the proxy's calls cost so far, per method (:mod:`tauopt.storage._callstats`)."""
        return self._call("Stats", {})

    def waiting_trial_ids(self, study_id: int) -> list[int] | None:
        """The ids of the study's waiting trials, by number."""
        reply = self._call("WaitingTrials", {"study_id": study_id})
        return None if reply is None else [int(tid) for tid in reply["ids"]]

    def set_trial_attrs(
        self, trial_id: int, *, user: dict[str, Any], system: dict[str, Any]
    ) -> None:
        items = [("user", k, v) for k, v in user.items()]
        items += [("system", k, v) for k, v in system.items()]
        for part in _parts(items):
            request = {"trial_id": trial_id, "user": _of(part, "user")}
            if self._call("SetTrialAttrs", {**request, "system": _of(part, "system")}) is None:
                set_trial_attrs_one_by_one(self.storage, trial_id, user=user, system=system)
                return

    def set_study_system_attrs(
        self, study_id: int, attrs: dict[str, Any], *, clear_prefix: str | None = None
    ) -> None:
        parts = list(_parts([("attrs", k, v) for k, v in attrs.items()])) or [[]]
        for i, part in enumerate(parts):
            request: dict[str, Any] = {"study_id": study_id, "attrs": _of(part, "attrs")}
            if clear_prefix is not None and i == len(parts) - 1:
                # cleared last, once every chunk of the new figure is written
                request.update(clear_prefix=clear_prefix, keep=list(attrs))
            if self._call("SetStudySystemAttrs", request) is None:
                set_study_system_attrs_one_by_one(
                    self.storage, study_id, attrs, clear_prefix=clear_prefix
                )
                return


def set_trial_attrs_one_by_one(
    storage: optuna.storages.BaseStorage,
    trial_id: int,
    *,
    user: dict[str, Any],
    system: dict[str, Any],
) -> None:
    """Through Optuna's storage API: one call per attribute."""
    for key, value in user.items():
        storage.set_trial_user_attr(trial_id, key, value)
    for key, value in system.items():
        storage.set_trial_system_attr(trial_id, key, value)


def set_study_system_attrs_one_by_one(
    storage: optuna.storages.BaseStorage,
    study_id: int,
    attrs: dict[str, Any],
    *,
    clear_prefix: str | None = None,
) -> None:
    """Through Optuna's storage API: one call per attribute."""
    if clear_prefix is not None:
        for key in storage.get_study_system_attrs(study_id):
            if key.startswith(clear_prefix) and key not in attrs:
                storage.set_study_system_attr(study_id, key, "")
    for key, value in attrs.items():
        storage.set_study_system_attr(study_id, key, value)
