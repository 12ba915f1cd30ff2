"""What a trial stores, in one place: :class:`TrialRecord` and its conversion to and from
Optuna's user attributes. No other module spells an attribute name.

Trials stored by earlier versions lack some keys; :meth:`TrialRecord.from_attrs` fills them
with what they can be derived from, or leaves them empty.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tauopt.engine import History, TrainConfig, TrainResult, parameter_count
from tauopt.study._point import NO_POINT, GridPoint

#: Study user attribute: the study's config, as stored by ``tauopt create``.
CONFIG_ATTR = "tauopt_config"
#: Study user attribute: when a worker last began to redraw the dashboard's figures (Unix
#: seconds), so that the workers of a study redraw them in turn, not each on its own.
FIGURES_AT_ATTR = "tauopt_figures_drawn_at"
#: Why a trial failed through its own fault (diverged, invalid parameters): it uses budget.
FAIL_REASON_ATTR = "fail_reason"
#: Why a trial was failed and queued again through no fault of its own (its worker stopped,
#: its model could not be saved): it uses no budget, and its retry reruns the same parameters.
RETRY_REASON_ATTR = "retry_reason"
#: Who ran the trial (host:pid), recorded once its parameters are fixed.
WORKER_ATTR = "worker"
#: A trial's run key, set at its first attempt and inherited by its retries: the name of its
#: saved state (see ``tauopt.study._resume``).
RUN_KEY_ATTR = "run_key"
#: Where the trial's latest saved state stands: {"epoch": e, "batch": b}.
SAVED_STATE_ATTR = "saved_state"
#: Where this attempt of the trial started: the saved state it went on from, or None.
STARTED_FROM_ATTR = "started_from"


def progressed(attrs: dict[str, Any]) -> bool:
    """Whether an attempt of a trial saved a state past the one it started from (its user
    attributes: a retry inherits them, these two included)."""
    saved, start = attrs.get(SAVED_STATE_ATTR), attrs.get(STARTED_FROM_ATTR)
    if not isinstance(saved, dict):
        return False
    if not isinstance(start, dict):
        return True
    point = (saved.get("epoch", 0), saved.get("batch", 0))
    return bool(point > (start.get("epoch", 0), start.get("batch", 0)))


#: A run of ``tauopt reproduce``: its TrainConfig, its coordinates and its unique name.
GRID_CONFIG_ATTR = "grid_config"
GRID_POINT_ATTR = "grid_point"
GRID_ID_ATTR = "grid_id"
#: Study user attribute: the anchor trials ``create`` plans for a Pareto study (their fixed
#: parameters) and whether all are enqueued; trial user attribute: an anchor's index.
ANCHORS_ATTR = "tauopt_anchors"
ANCHOR_ATTR = "anchor"
#: Study user attributes that are tauopt's bookkeeping, not the study's description: the
#: dashboard leaves them out of the study's attributes (the config stays: it says what the
#: study trains).
INTERNAL_STUDY_ATTRS = (FIGURES_AT_ATTR, ANCHORS_ATTR)
#: A second copy of a grid run, enqueued at the same moment by another process: failed, with
#: the number of the run it copies.
DUPLICATE_ATTR = "duplicate_of"
#: A trial's (validation accuracy, active parameters) at a rung of ``stop_trials = "dominated"``.
_RUNG_PREFIX = "rung_"
#: The stored names of a trial's per-epoch lists, in :class:`History`'s order.
HISTORY_ATTRS = tuple(
    name for f in dataclasses.fields(History) if (name := History.name_in(f, "stored")) is not None
)
#: A finished trial's training config (:meth:`TrialRecord.to_attrs`).
_CONFIG_KEY = "train_config"
#: Input width and classes of the studies stored before they were recorded: MNIST's.
_LEGACY_SHAPE = (784, 10)


@dataclass(frozen=True, kw_only=True)
class TrialRecord:
    """What one finished trial stored: its config, where its run ended (the final values of
    :class:`tauopt.engine.TrainResult`), its per-epoch :class:`tauopt.engine.History`, and
    where it ran. ``val_accuracy`` is None for a run without validation."""

    config: TrainConfig
    test_accuracy: float
    val_accuracy: float | None
    active_blocks: int
    active_params: int
    initial_params: int
    in_features: int
    num_classes: int
    taus: list[float]
    device: str = ""
    active_block_ids: list[int] = field(default_factory=list)
    history: History = field(default_factory=History)
    model_artifact_id: str | None = None
    #: Stored when the run is enqueued, not by the worker: never written by :meth:`to_attrs`.
    grid_point: GridPoint | None = None
    #: Where it trained: the CPU model and cores, or the GPU's name.
    machine: str = ""

    @property
    def seed(self) -> int:
        return self.config.seed

    @property
    def point(self) -> GridPoint:
        """Its coordinates in a grid of ``tauopt reproduce`` (none in a search study)."""
        return self.grid_point or NO_POINT

    @property
    def tau_sum(self) -> float:
        return sum(self.taus)

    @property
    def final_val_accuracy(self) -> float:
        """The final validation accuracy, NaN without validation images."""
        return math.nan if self.val_accuracy is None else self.val_accuracy

    @property
    def train_accuracy(self) -> float | None:
        """The last epoch's training accuracy (None where it was not recorded)."""
        values = self.history.train_accuracy
        return values[-1] if values else None

    @property
    def blocks_removed(self) -> int:
        return len(self.history.pruned)

    @property
    def params_removed(self) -> float:
        """Share of the unpruned network's parameters that pruning removed, 0..1."""
        return 1.0 - self.active_params / self.initial_params if self.initial_params else 0.0

    @classmethod
    def from_result(
        cls,
        result: TrainResult,
        in_features: int,
        num_classes: int,
        *,
        artifact_id: str | None,
        machine: str = "",
    ) -> TrialRecord:
        """The record of a finished run: every field it shares with the result, and where
        it ran."""
        shared = {f.name for f in dataclasses.fields(cls)} & {
            f.name for f in dataclasses.fields(result)
        }
        val = result.final_val_accuracy
        return cls(
            **{name: getattr(result, name) for name in shared},
            val_accuracy=None if math.isnan(val) else val,
            in_features=in_features,
            num_classes=num_classes,
            model_artifact_id=artifact_id,
            machine=machine,
        )

    def to_attrs(self) -> dict[str, Any]:
        """The user attributes (JSON-ready): every field under its stored name, the history's
        lists under theirs; ``tau_sum`` and ``seed`` also, for export."""
        attrs: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, History):
                attrs.update(value.to_names("stored"))
            elif isinstance(value, TrainConfig):
                attrs[_CONFIG_KEY] = value.to_dict()
            elif f.name != "grid_point":  # stored at enqueue time, not by the worker
                attrs[f.name] = copy.deepcopy(value)
        return {**attrs, "tau_sum": self.tau_sum, "seed": self.seed}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> TrialRecord:
        """The record of a finished trial from its user attributes; what a trial stored by
        an earlier version lacks is derived or left empty."""
        config = TrainConfig(**attrs.get(_CONFIG_KEY, {}))
        in_features = int(attrs.get("in_features", _LEGACY_SHAPE[0]))
        num_classes = int(attrs.get("num_classes", _LEGACY_SHAPE[1]))
        initial = attrs.get("initial_params") or parameter_count(config, in_features, num_classes)
        point = attrs.get(GRID_POINT_ATTR)
        optional = {"device", "active_block_ids", "model_artifact_id", "machine"}
        return cls(
            **{k: v for k, v in attrs.items() if k in optional},
            config=config,
            in_features=in_features,
            num_classes=num_classes,
            initial_params=int(initial),
            val_accuracy=attrs.get("val_accuracy"),
            test_accuracy=float(attrs.get("test_accuracy", math.nan)),
            active_blocks=int(attrs.get("active_blocks", len(attrs.get("taus", [])))),
            active_params=int(attrs.get("active_params", 0)),
            taus=list(attrs.get("taus", [])),
            history=History.from_names(attrs, "stored", strict=False),
            grid_point=None if point is None else GridPoint.of(point),
        )


def grid_config(attrs: dict[str, Any]) -> TrainConfig | None:
    """The fixed TrainConfig of a ``tauopt reproduce`` run (None for a searched trial)."""
    stored = attrs.get(GRID_CONFIG_ATTR)
    return None if stored is None else TrainConfig(**stored)


def rung_attr(epoch: int) -> str:
    return f"{_RUNG_PREFIX}{epoch}"


def rungs_of(attrs: dict[str, Any]) -> dict[int, tuple[float, float]]:
    """A trial's rungs: epoch -> (validation accuracy, active parameters)."""
    return {
        int(key[len(_RUNG_PREFIX) :]): (float(value[0]), float(value[1]))
        for key, value in attrs.items()
        if key.startswith(_RUNG_PREFIX)
    }
