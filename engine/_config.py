"""The frozen configuration of one training run, validated where it is made."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from tauopt.engine._data import DATASETS, SPLIT_SEED, is_arrays
from tauopt.errors import ConfigError

Arch = Literal["resnet", "fracdnn"]
ARCHS: tuple[str, ...] = ("resnet", "fracdnn")
PruneRule = Literal["all", "smallest"]
#: ``all``: every block under the threshold goes at once; ``smallest``: only the smallest one
#: per check (the papers' published code).
PRUNE_RULES: tuple[str, ...] = ("all", "smallest")
Precision = Literal["float32", "bfloat16"]
#: ``bfloat16``: the training step's matrix products take bfloat16 operands; weights, taus and
#: everything else stay float32 (see ``tauopt.models.TauPopulation``). Evaluation is float32.
PRECISIONS: tuple[str, ...] = ("float32", "bfloat16")
#: A run of more epochs would not end in a lifetime (a million epochs of the smallest
#: network on a GPU are weeks).
MAX_EPOCHS = 1_000_000
#: The most validation images a run holds out when it is not told how many (see
#: :func:`default_val_size`).
DEFAULT_VAL_CAP = 10_000


def default_val_size(train_images: int) -> int:
    """The validation images held out of a training split of ``train_images`` when
    ``val_size`` is unset: a fifth of it (at least one), at most :data:`DEFAULT_VAL_CAP`.
    Every named dataset (60,000 or 50,000 training images) holds out 10,000, as the papers
    do; scikit-learn's digits (1,347 training images in a 3:1 split) hold out 269."""
    return min(DEFAULT_VAL_CAP, max(1, train_images // 5))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything that determines one training run. Defaults are the papers' reference setting.

    ``prune_eps=None`` disables adaptive layer pruning; otherwise every ``prune_every`` epochs
    the ResNet blocks whose ``|tau_l| / sum|tau|`` fall below ``prune_eps`` are removed: all of
    them (``prune_rule="all"``) or the smallest one (``"smallest"``, the papers' code).
    ``train_size`` takes a subset of the training split (after the validation hold-out);
    ``val_size=0`` holds nothing out (no validation accuracy); unset, the run holds out
    :func:`default_val_size` of the dataset's training split (:meth:`for_training_split`).

    The horizon ``sum(tau) = T`` exactly: ``dependent_last_tau`` computes the last tau as
    ``T - sum(others)`` in the forward pass (the gradients see the constraint);
    ``projected_last_tau`` overwrites it with that after every step (the papers' code: no
    gradient through it).
    """

    arch: Arch = "resnet"
    dataset: str = "mnist"
    epochs: int = 10
    T: float = 1.0
    l1: float = 0.0
    horizon_weight: float = 0.0
    dependent_last_tau: bool = False
    projected_last_tau: bool = False
    prune_eps: float | None = None
    prune_every: int = 1
    prune_rule: PruneRule = "all"
    gamma: float = 0.5
    width: int = 100
    depth: int = 6
    lr: float = 0.01
    batch_size: int = 100
    seed: int = 0
    fixed_tau: bool = False
    #: The input block's tau fixed at ``T / depth``, the others trained: the ResNet that the
    #: papers' published code builds with ``tau_is_trainable=False`` (see
    #: ``tauopt.models.TauNetwork``). ``fixed_tau`` fixes every tau.
    fixed_input_tau: bool = False
    train_size: int | None = None
    val_size: int | None = None
    tau_min: float = 1e-4
    detach_memory: bool = False
    #: Standardise every input feature by the training split's mean and std (stored with the
    #: model, which applies them to whatever it is given).
    normalize: bool = False
    #: Seed of the order of the training batches; unset, ``seed`` (which also initialises the
    #: network). A study gives all its trials one order, so that any of them can train together
    #: (see ``tauopt.engine.train_population``) and differences come from the hyperparameters.
    data_seed: int | None = None
    #: Seed of the draw that holds out the validation images and picks ``train_size`` of the
    #: rest; unset, one fixed draw (``tauopt.engine.SPLIT_SEED``) that every run shares, so
    #: that the trials of a study select on the same images.
    split_seed: int | None = None
    #: The operand type of the training step's matrix products (see :data:`PRECISIONS`).
    precision: Precision = "float32"

    def __post_init__(self) -> None:
        _require(self.arch in ARCHS, f"arch must be one of {ARCHS}, got {self.arch!r}")
        _require(
            isinstance(self.dataset, str) and (self.dataset in DATASETS or is_arrays(self.dataset)),
            f"dataset must be one of {tuple(DATASETS)} or the path of an .npz file, got "
            f"{self.dataset!r}",
        )
        _require(
            self.precision in PRECISIONS,
            f"precision must be one of {PRECISIONS}, got {self.precision!r}",
        )
        _require(
            self.prune_rule in PRUNE_RULES,
            f"prune_rule must be one of {PRUNE_RULES}, got {self.prune_rule!r}",
        )
        _require(
            self.val_size is None or (_is_int(self.val_size) and self.val_size >= 0),
            f"val_size must be an integer >= 0 (0: no validation; unset: a fifth of the "
            f"training split, at most {DEFAULT_VAL_CAP:,}), got {self.val_size!r}",
        )
        _require(
            _is_int(self.epochs) and 1 <= self.epochs <= MAX_EPOCHS,
            f"epochs must be an integer in [1, {MAX_EPOCHS}], got {self.epochs!r}",
        )
        for name in ("width", "depth", "batch_size", "prune_every"):
            value = getattr(self, name)
            _require(
                _is_int(value) and value >= 1, f"{name} must be an integer >= 1, got {value!r}"
            )
        _require(
            _is_int(self.seed) and self.seed >= 0,
            f"seed must be an integer >= 0, got {self.seed!r}",
        )
        _require(
            self.data_seed is None or (_is_int(self.data_seed) and self.data_seed >= 0),
            f"data_seed must be an integer >= 0 (or unset to use seed), got {self.data_seed!r}",
        )
        _require(
            self.split_seed is None or (_is_int(self.split_seed) and self.split_seed >= 0),
            "split_seed must be an integer >= 0 (or unset for the shared split), got "
            f"{self.split_seed!r}",
        )
        _require(
            not (self.fixed_tau and self.fixed_input_tau),
            "fixed_tau fixes every tau already: set fixed_input_tau (only the input block's "
            "tau fixed) or fixed_tau, not both",
        )
        if self.train_size is not None:
            _require(
                _is_int(self.train_size) and self.train_size >= 1,
                f"train_size must be an integer >= 1 (or unset for all), got {self.train_size!r}",
            )
        for name in ("T", "lr", "tau_min"):
            value = getattr(self, name)
            _require(
                _is_real(value) and value > 0, f"{name} must be a positive number, got {value!r}"
            )
        for name in ("l1", "horizon_weight"):
            value = getattr(self, name)
            _require(_is_real(value) and value >= 0, f"{name} must be a number >= 0, got {value!r}")
        _require(
            _is_real(self.gamma) and 0 < self.gamma < 1,
            f"gamma (fractional order) must lie in (0, 1), got {self.gamma!r}",
        )
        for name in ("dependent_last_tau", "projected_last_tau"):
            _require(
                not getattr(self, name) or self.depth >= 2,
                f"{name} needs depth >= 2: the last tau is T minus the others",
            )
        _require(
            not (self.dependent_last_tau and self.projected_last_tau),
            "dependent_last_tau and projected_last_tau are two ways to the same constraint: "
            "set one of them",
        )
        if self.prune_eps is not None:
            _require(
                _is_real(self.prune_eps) and 0 < self.prune_eps < 1,
                "prune_eps must lie in (0, 1) (or unset to disable pruning), "
                f"got {self.prune_eps!r}",
            )
            _require(
                self.arch == "resnet",
                "prune_eps applies to arch 'resnet' only: a fractional block is not an identity "
                "map at tau = 0 (its memory term remains); unset prune_eps",
            )
        if self.arch == "fracdnn":
            _require(
                self.tau_min <= self.T / self.depth,
                f"tau_min ({self.tau_min}) must not exceed the initial step T/depth "
                f"({self.T / self.depth:g}); lower tau_min or raise T",
            )

    @property
    def order_seed(self) -> int:
        """The seed of the batches' order: ``data_seed``, or ``seed`` where it is unset."""
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def split_order(self) -> int:
        """The seed of the validation and training-subset draw: ``split_seed``, or the shared
        :data:`tauopt.engine.SPLIT_SEED` where it is unset."""
        return SPLIT_SEED if self.split_seed is None else self.split_seed

    def for_training_split(self, train_images: int) -> TrainConfig:
        """This config with ``val_size`` settled for a training split of ``train_images``
        (:func:`default_val_size` where it is unset): what a run on that data trains."""
        if self.val_size is not None:
            return self
        return self.replace(val_size=default_val_size(train_images))

    @property
    def held_out(self) -> int:
        """``val_size``, once settled (see :meth:`for_training_split`)."""
        if self.val_size is None:
            raise ConfigError("val_size is unset: settle it for the data with for_training_split")
        return self.val_size

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
