"""tauopt's own calls on the proxy's port, beside Optuna's storage service: many attributes of
a trial, or many system attributes of a study, in one call and one transaction.

Optuna's service sets one attribute per call, each in a transaction of its own: a finished
trial's record is some 25 calls, a figure a hundred. ``tauopt proxy`` also serves
:data:`SERVICE`; a client of a proxy that does not (Optuna's ``run_grpc_proxy_server``) falls
back to one call per attribute, as before. Requests and replies are JSON; a request stays
under :data:`MAX_REQUEST_BYTES` (gRPC's default limit is 4 MiB), more goes as several calls.
The service writes straight to the database behind the proxy: both Optuna's caches (the
proxy's and the client's) keep only finished trials, whose attributes no longer change.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import grpc
import optuna

from tauopt.storage import _optuna as private
from tauopt.storage._retry import is_transient, root_message

SERVICE = "tauopt.Batch"
MAX_REQUEST_BYTES = 1 << 20
_Item = tuple[str, str, Any]  # (kind, key, value)


def _dumps(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


def _loads(data: bytes) -> dict[str, Any]:
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError("a request is a JSON object")
    return message


@contextlib.contextmanager
def _status(context: grpc.ServicerContext) -> Iterator[None]:
    """Optuna's errors as the status codes its own service uses; a failure of the proxy's
    database connection as UNAVAILABLE, which a worker rides out (the write is an upsert)."""
    try:
        yield
    except KeyError as e:
        context.abort(grpc.StatusCode.NOT_FOUND, str(e))
    except optuna.exceptions.UpdateFinishedTrialError as e:
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
    except Exception as e:
        if is_transient(e):
            context.abort(grpc.StatusCode.UNAVAILABLE, root_message(e))
        raise


class BatchService:
    """The proxy's side, on the database behind it."""

    def __init__(self, rdb: optuna.storages.RDBStorage) -> None:
        self.rdb = rdb

    def handler(self) -> grpc.GenericRpcHandler:
        calls = {"SetTrialAttrs": self._trial_attrs, "SetStudySystemAttrs": self._study_attrs}
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                name: grpc.unary_unary_rpc_method_handler(
                    call, request_deserializer=_loads, response_serializer=_dumps
                )
                for name, call in calls.items()
            },
        )

    def _trial_attrs(self, request: dict[str, Any], context: Any) -> dict[str, Any]:
        with _status(context):
            private.set_trial_attrs(
                self.rdb, int(request["trial_id"]), user=request["user"], system=request["system"]
            )
        return {}

    def _study_attrs(self, request: dict[str, Any], context: Any) -> dict[str, Any]:
        with _status(context):
            private.set_study_system_attrs(
                self.rdb,
                int(request["study_id"]),
                request["attrs"],
                clear_prefix=request.get("clear_prefix"),
                keep=frozenset(request.get("keep", ())),
            )
        return {}


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


class BatchClient:
    """A worker's side: the batched calls of the proxy at ``host:port``, each falling back to
    one call per attribute of ``storage`` (the proxy's Optuna client) where the proxy offers
    none (:attr:`offered` turns False at the first UNIMPLEMENTED)."""

    def __init__(self, storage: optuna.storages.BaseStorage, host: str, port: int) -> None:
        self.storage = storage
        self.offered = True
        self._channel = grpc.insecure_channel(f"{host}:{port}")
        self._calls = {
            name: self._channel.unary_unary(
                f"/{SERVICE}/{name}", request_serializer=_dumps, response_deserializer=_loads
            )
            for name in ("SetTrialAttrs", "SetStudySystemAttrs")
        }

    def close(self) -> None:
        self._channel.close()

    def _call(self, name: str, request: dict[str, Any]) -> bool:
        """Whether the proxy took ``request``; False where it offers no batched calls."""
        if not self.offered:
            return False
        try:
            self._calls[name](request)
        except grpc.RpcError as e:
            code = e.code()  # the error of a call is also the call: code(), details()
            if code == grpc.StatusCode.UNIMPLEMENTED:
                self.offered = False
                return False
            if code == grpc.StatusCode.NOT_FOUND:
                raise KeyError(e.details()) from e
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                raise optuna.exceptions.UpdateFinishedTrialError(e.details()) from e
            raise
        return True

    def set_trial_attrs(
        self, trial_id: int, *, user: dict[str, Any], system: dict[str, Any]
    ) -> None:
        items = [("user", k, v) for k, v in user.items()]
        items += [("system", k, v) for k, v in system.items()]
        for part in _parts(items):
            request = {"trial_id": trial_id, "user": _of(part, "user")}
            if not self._call("SetTrialAttrs", {**request, "system": _of(part, "system")}):
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
            if not self._call("SetStudySystemAttrs", request):
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
