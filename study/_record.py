"""What a trial stores, in one place: :class:`TrialRecord` and its conversion to and from
Optuna's user attributes. No other module spells an attribute name.

Trials stored by earlier versions lack some keys; :meth:`TrialRecord.from_attrs` fills them
with what they can be derived from, or leaves them empty.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from tauopt.engine import TrainConfig, TrainResult, parameter_count

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
#: Input width and classes of the studies stored before they were recorded: MNIST's.
_LEGACY_SHAPE = (784, 10)


@dataclass(frozen=True)
class TrialRecord:
    """The metrics and settings of one finished trial (see :class:`tauopt.engine.TrainResult`
    for what each history means). ``val_accuracy`` is None for a run without validation."""

    train_config: dict[str, Any]
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
    val_accuracy_history: list[float] = field(default_factory=list)
    test_accuracy_history: list[float] = field(default_factory=list)
    train_accuracy_history: list[float] = field(default_factory=list)
    train_loss_history: list[float] = field(default_factory=list)
    clean_loss_history: list[float] = field(default_factory=list)
    penalty_history: list[dict[str, float]] = field(default_factory=list)
    tau_history: list[list[float]] = field(default_factory=list)
    pruned_layers: list[dict[str, int]] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    model_artifact_id: str | None = None
    grid_point: dict[str, Any] | None = None
    #: Where it trained: the CPU model and cores, or the GPU's name.
    machine: str = ""
    #: Where it went on from a saved state after a stop, in order: {"epoch": e, "batch": b}
    #: (after e epochs and b batches of the next). Empty: trained in one go.
    resumed_from: list[dict[str, int]] = field(default_factory=list)

    @property
    def config(self) -> TrainConfig:
        return TrainConfig(**self.train_config)

    @property
    def seed(self) -> int:
        return int(self.train_config.get("seed", 0))

    @property
    def tau_sum(self) -> float:
        return sum(self.taus)

    @property
    def train_accuracy(self) -> float | None:
        """The last epoch's training accuracy (None where it was not recorded)."""
        return self.train_accuracy_history[-1] if self.train_accuracy_history else None

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
        val = result.final_val_accuracy
        return cls(
            train_config=result.config.to_dict(),
            test_accuracy=result.test_accuracy,
            val_accuracy=None if math.isnan(val) else val,
            active_blocks=result.active_blocks,
            active_params=result.active_params,
            initial_params=result.initial_params,
            in_features=in_features,
            num_classes=num_classes,
            taus=result.taus,
            device=result.device,
            active_block_ids=result.active_block_ids,
            val_accuracy_history=result.history.val_accuracy,
            test_accuracy_history=result.history.test_accuracy,
            train_accuracy_history=result.history.train_accuracy,
            train_loss_history=result.history.train_loss,
            clean_loss_history=result.history.clean_loss,
            penalty_history=result.history.penalties,
            tau_history=result.history.taus,
            pruned_layers=[vars(event) for event in result.history.pruned],
            epoch_seconds=result.history.epoch_seconds,
            model_artifact_id=artifact_id,
            machine=machine,
            resumed_from=result.history.resumed_from,
        )

    def to_attrs(self) -> dict[str, Any]:
        """The user attributes (JSON-ready); ``tau_sum`` and ``seed`` also, for export."""
        attrs = dataclasses.asdict(self)
        attrs.pop("grid_point")  # stored at enqueue time, not by the worker
        return {**attrs, "tau_sum": self.tau_sum, "seed": self.seed}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> TrialRecord:
        """The record of a finished trial from its user attributes."""
        config = dict(attrs.get("train_config", {}))
        in_features = int(attrs.get("in_features", _LEGACY_SHAPE[0]))
        num_classes = int(attrs.get("num_classes", _LEGACY_SHAPE[1]))
        initial = attrs.get("initial_params") or parameter_count(
            TrainConfig(**config), in_features, num_classes
        )
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in attrs.items() if k in names}
        return cls(
            **{
                **known,
                "train_config": config,
                "in_features": in_features,
                "num_classes": num_classes,
                "initial_params": int(initial),
                "val_accuracy": attrs.get("val_accuracy"),
                "test_accuracy": float(attrs.get("test_accuracy", math.nan)),
                "active_blocks": int(attrs.get("active_blocks", len(attrs.get("taus", [])))),
                "active_params": int(attrs.get("active_params", 0)),
                "taus": list(attrs.get("taus", [])),
                "train_loss_history": list(attrs.get("train_loss_history", [])),
            }
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
