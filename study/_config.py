"""The study configuration: search space, per-trial budget and study settings, from TOML.

Shape of the file (every table and key optional; unknown ones are errors)::

    [study]
    objective = "pareto"        # or "accuracy" (single objective, per-epoch trial pruning)
    n_trials = 30               # total across all workers
    min_val_accuracy = 0.5      # below: infeasible, never "best"
    stop_trials = "auto"        # "off", "median" (accuracy) or "dominated" (pareto)
    anchors = 3                 # pareto: first trials placed where the search prunes most

    [search]                    # [low, high] = range, a list = choices, a value = fixed
    arch = ["resnet", "fracdnn"]
    T = [0.5, 10.0]
    width = 100
    depth = [4, 6, 8]           # numeric lists of other than two entries are choices

    [trial]
    dataset = "mnist"
    epochs = 3
    train_size = 10000          # 0: all that the validation images leave
    val_size = 10000            # unset: a fifth of the training split, at most 10,000
    checkpoint_seconds = 60     # a running trial's state saved this often; 0: never

    [storage]
    heartbeat_interval = 10
    grace_period = 30
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomllib

from tauopt.engine._config import ARCHS, MAX_EPOCHS, PRECISIONS, PRUNE_RULES, Precision
from tauopt.engine._data import DATASETS, is_arrays
from tauopt.errors import ConfigError
from tauopt.storage import StorageSettings

Objective = Literal["pareto", "accuracy", "grid"]
#: What a user's study optimises: validation accuracy and the parameters left (``pareto``) or
#: validation accuracy alone (``accuracy``). ``grid`` is a ``tauopt reproduce`` study: fixed
#: runs, nothing searched or selected, their final test accuracy told as the value.
OBJECTIVES: tuple[str, ...] = ("pareto", "accuracy")
GRID_OBJECTIVE = "grid"
#: Half the images right, five times chance: below it a trial is no model anyone wants, however
#: small (a chance-level network once sat on the Pareto front as "best").
DEFAULT_MIN_VAL_ACCURACY = 0.5
#: Time-regularisation modes: none, the quadratic horizon penalty, the dependent last tau
#: (a gradient through ``sum(tau) = T``), or the projected last tau (the papers' code).
TIME_REGS: tuple[str, ...] = ("none", "penalty", "dependent", "projected")
#: Which step sizes train: all, none (``fixed``), or all but the input block's
#: (``input-fixed``: the papers' published code's "fixed" ResNet, see ``TrainConfig``).
TAU_MODES: tuple[str, ...] = ("trainable", "fixed", "input-fixed")


@dataclass(frozen=True)
class _ParamSpec:
    kind: Literal["int", "float", "choice"]
    low: float | None = None  # smallest admissible value
    high: float | None = None  # largest admissible value
    open_low: bool = False  # low itself excluded
    open_high: bool = False
    log: bool = False  # ranges sampled on a log scale
    options: tuple[str, ...] = ()
    #: A range from 0 means "off or on": off is a value of its own, on a log range.
    zero_is_off: bool = False


#: Every searchable name. ``layer_prune_eps`` is the threshold for removing ResNet *layers*;
#: Optuna's own *trial* pruning is a different thing (see ``objective = "accuracy"``).
PARAMS: dict[str, _ParamSpec] = {
    "arch": _ParamSpec("choice", options=ARCHS),
    "T": _ParamSpec("float", low=0.0, open_low=True, log=True),
    "l1": _ParamSpec("float", low=0.0, zero_is_off=True),
    "layer_prune_eps": _ParamSpec(
        "float", low=0.0, high=1.0, open_low=True, open_high=True, log=True
    ),
    "depth": _ParamSpec("int", low=1),
    "width": _ParamSpec("int", low=1),
    "gamma": _ParamSpec("float", low=0.0, high=1.0, open_low=True, open_high=True),
    "time_reg": _ParamSpec("choice", options=TIME_REGS),
    "taus": _ParamSpec("choice", options=TAU_MODES),
    "prune_rule": _ParamSpec("choice", options=PRUNE_RULES),
    "horizon_weight": _ParamSpec("float", low=0.0, open_low=True, log=True),
    "lr": _ParamSpec("float", low=0.0, open_low=True, log=True),
}

# Ranges chosen so that plain SGD stays stable: the horizon penalty's curvature is
# 2 * horizon_weight * depth, so lr * that must stay well below 2 (0.3 * 0.2 * 8 = 0.48).
#
# The default front is the pruning trade-off: the ResNet alone (a fractional block is never an
# identity map, so the FracDNN never prunes; add it with arch = ["resnet", "fracdnn"]), at the
# reference width and depth, searching the time regularisation and the pruning threshold. In a
# 30-trial default run eps in [0.01, 0.2] and l1 up to 0.01 pruned in 4 of 30 trials, eps up to
# 0.3 and l1 up to 0.05 in 28 of 30 (nearly all to one block): these ranges sit in between.
DEFAULT_SEARCH: dict[str, Any] = {
    "arch": "resnet",
    "T": [0.5, 10.0],
    "l1": [0.0, 0.02],  # off, or on in [0.0002, 0.02] (log)
    "layer_prune_eps": [0.02, 0.2],
    "prune_rule": "all",
    # The papers' reference architecture, fixed: what separates the front is then pruning and
    # the time regularisation, not a width or depth drawn at random. Search them in a config.
    "depth": 6,
    "width": 100,
    "gamma": [0.1, 0.9],
    "time_reg": ["none", "penalty", "dependent"],
    "taus": "trainable",
    "horizon_weight": [0.001, 0.1],
    "lr": [0.01, 0.3],
}


#: Stop rules a study may name; ``auto`` is ``median`` for ``accuracy``, ``off`` for ``pareto``.
STOP_RULES: tuple[str, ...] = ("auto", "off", "median", "dominated")


def stop_rule(rule: str, objective: str) -> str:
    """The rule a study runs: ``auto`` resolved, a combination that cannot work refused."""
    if rule not in STOP_RULES:
        raise ConfigError(f"study.stop_trials: {rule!r} is not one of {list(STOP_RULES)}")
    if rule == "auto":
        return "median" if objective == "accuracy" else "off"
    if rule == "median" and objective != "accuracy":
        raise ConfigError(
            "study.stop_trials: 'median' needs one objective (objective = \"accuracy\"); a "
            "Pareto study stops trials with 'dominated'"
        )
    return rule


#: Bounds past which a study cannot finish: a billion trials, or a million epochs per trial.
MAX_TRIALS = 1_000_000_000
#: An "off or on" range ``[0, high]`` draws its on-values from ``[high / 100, high]``.
OFF_DECADES = 100.0


@dataclass(frozen=True)
class SearchParam:
    """One searched name: a range (``low``/``high``), categorical ``choices``, or ``fixed``."""

    name: str
    kind: Literal["int", "float", "choice"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None
    fixed: Any = None
    #: ``[0, high]`` where 0 means "off": off is drawn as a value of its own
    #: (``{name}_on`` False), on from the log range :attr:`on_range`.
    off: bool = False

    @property
    def on_range(self) -> tuple[float, float]:
        """Where an "off or on" parameter is drawn when on: two decades below ``high``."""
        high = float(self.high or 0.0)
        return high / OFF_DECADES, high

    def to_toml_value(self) -> Any:
        if self.choices is not None:
            return list(self.choices)
        if self.low is not None:
            return [self.low, self.high]
        return self.fixed


#: A trial's training images where the config does not say (a quick trial: 3 epochs of them
#: take seconds on a CPU).
DEFAULT_TRAIN_SIZE = 10_000


@dataclass(frozen=True)
class TrialBudget:
    """What every trial trains on and for how long."""

    dataset: str = "mnist"  # a name, or the path of an .npz file
    epochs: int = 3
    #: Training images per trial, 0 for all that the validation split leaves; unset,
    #: ``tauopt create`` stores :data:`DEFAULT_TRAIN_SIZE`, or all where that is fewer.
    train_size: int | None = None
    batch_size: int = 100
    #: Unset: ``tauopt create`` stores :func:`tauopt.engine.default_val_size` of the
    #: dataset's training split (a fifth, at most 10,000).
    val_size: int | None = None
    normalize: bool = False  # standardise the inputs by the training split's statistics
    #: The training step's products: "float32" or "bfloat16" (``tauopt.engine.PRECISIONS``); a
    #: worker's ``--precision`` overrides it for the trials it trains.
    precision: Precision = "float32"
    #: A user's .npz file's content hash, set by ``tauopt create``: a worker whose file
    #: differs refuses to train.
    dataset_sha256: str = ""
    #: Seconds of training between two saves of a running trial's state (at the first epoch
    #: boundary after them), so that a stopped trial goes on from there; 0: none saved.
    checkpoint_seconds: float = 60.0

    @property
    def train_images(self) -> int | None:
        """``train_size`` as :class:`tauopt.engine.TrainConfig` takes it: None for all;
        unset, :data:`DEFAULT_TRAIN_SIZE` (which ``create`` caps at what the data leaves)."""
        if self.train_size is None:
            return DEFAULT_TRAIN_SIZE
        return self.train_size or None


@dataclass(frozen=True)
class StudyConfig:
    """A complete, validated study configuration (see the module docstring for the file)."""

    search: Mapping[str, SearchParam]
    trial: TrialBudget = field(default_factory=TrialBudget)
    objective: Objective = "pareto"
    n_trials: int = 30
    #: Trials below this validation accuracy are infeasible (an Optuna constraint): stored and
    #: shown as such, never "best".
    min_val_accuracy: float = DEFAULT_MIN_VAL_ACCURACY
    heartbeat_interval: int = StorageSettings.heartbeat_interval
    grace_period: int | None = StorageSettings.grace_period
    #: Stopping poor trials early: "auto" (the median rule for ``accuracy``, nothing for
    #: ``pareto``), "off", "median" or "dominated" (see ``tauopt.study._stopping``).
    stop_trials: str = "auto"
    #: Pareto studies: how many first trials ``create`` enqueues where the search space prunes
    #: most (see ``tauopt.study._anchors``); 0: none, every trial drawn by the sampler.
    anchors: int = 3

    def to_dict(self) -> dict[str, Any]:
        """The TOML-shaped dict, as stored with the study so every worker uses the same."""
        storage: dict[str, Any] = {"heartbeat_interval": self.heartbeat_interval}
        if self.grace_period is not None:
            storage["grace_period"] = self.grace_period
        trial = dataclasses.asdict(self.trial)
        for key in ("train_size", "val_size"):
            if trial[key] is None:  # unset: the default rule (create settles it)
                del trial[key]
        return {
            "study": {
                "objective": self.objective,
                "n_trials": self.n_trials,
                "min_val_accuracy": self.min_val_accuracy,
                "stop_trials": self.stop_trials,
                "anchors": self.anchors,
            },
            "search": {name: p.to_toml_value() for name, p in self.search.items()},
            "trial": trial,
            "storage": storage,
        }

    def with_overrides(self, **changes: Any) -> StudyConfig:
        """Apply command-line overrides (``None`` means not given) and validate again."""
        data = self.to_dict()
        for key, table in (
            ("n_trials", "study"),
            ("objective", "study"),
            ("epochs", "trial"),
            ("train_size", "trial"),
            ("val_size", "trial"),
            ("dataset", "trial"),
            ("normalize", "trial"),
            ("heartbeat_interval", "storage"),
            ("grace_period", "storage"),
        ):
            if changes.get(key) is not None:
                data[table][key] = changes[key]
        return parse_config(data)


def _fail(key: str, message: str) -> ConfigError:
    return ConfigError(f"{key}: {message}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_value(key: str, spec: _ParamSpec, value: Any) -> Any:
    if spec.kind == "choice":
        if value not in spec.options:
            raise _fail(key, f"{value!r} is not one of {list(spec.options)}")
        return value
    if spec.kind == "int" and not (isinstance(value, int) and not isinstance(value, bool)):
        raise _fail(key, f"expected an integer, got {value!r}")
    if not _is_number(value):
        raise _fail(key, f"expected a number, got {value!r}")
    if spec.low is not None and (value < spec.low or (spec.open_low and value == spec.low)):
        bound = ">" if spec.open_low else ">="
        raise _fail(key, f"{value!r} must be {bound} {spec.low}")
    if spec.high is not None and (value > spec.high or (spec.open_high and value == spec.high)):
        bound = "<" if spec.open_high else "<="
        raise _fail(key, f"{value!r} must be {bound} {spec.high}")
    return float(value) if spec.kind == "float" else value


def _parse_param(name: str, value: Any) -> SearchParam:
    key = f"search.{name}"
    spec = PARAMS.get(name)
    if spec is None:
        raise _fail(key, f"unknown search parameter; known: {', '.join(PARAMS)}")
    if isinstance(value, list):
        if not value:
            raise _fail(key, "an empty list; give [low, high], choices, or a single value")
        if spec.kind != "choice" and len(value) == 2:
            low, high = (_check_value(key, spec, v) for v in value)
            if low >= high:
                raise _fail(key, f"low {low!r} must be below high {high!r} (or give one value)")
            log = spec.log and low > 0
            off = spec.zero_is_off and low == 0
            return SearchParam(name, spec.kind, low=low, high=high, log=log, off=off)
        choices = tuple(_check_value(key, spec, v) for v in value)
        if len(set(choices)) != len(choices):
            raise _fail(key, f"repeated choices in {list(choices)}")
        return SearchParam(name, "choice", choices=choices)
    return SearchParam(name, spec.kind, fixed=_check_value(key, spec, value))


def _take(table: Mapping[str, Any], key: str, where: str, default: Any) -> Any:
    """``table[key]`` (or the default), of the default's type."""
    if key not in table:
        return default
    value = table[key]
    kind = type(default) if default is not None else int
    if kind is bool and not isinstance(value, bool):
        raise _fail(f"{where}.{key}", f"expected true or false, got {value!r}")
    if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise _fail(f"{where}.{key}", f"expected an integer, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise _fail(f"{where}.{key}", f"expected a string, got {value!r}")
    return value


def _only(table: Any, where: str, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(table, Mapping):
        raise _fail(where, f"expected a table, got {table!r}")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise _fail(f"{where}.{unknown[0]}", f"unknown key; allowed: {', '.join(sorted(allowed))}")
    return table


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise _fail(key, f"must be an integer >= {low}, got {value!r}")


#: Each default once, where it lives: the dataclasses above.
_BUDGET = TrialBudget()
_STUDY = {f.name: f.default for f in dataclasses.fields(StudyConfig) if f.init}


def parse_config(data: Mapping[str, Any]) -> StudyConfig:
    """Validate a TOML-shaped dict; defaults fill whatever is missing."""
    _only(data, "config", {"study", "search", "trial", "storage"})
    study = _only(
        data.get("study", {}),
        "study",
        {"objective", "n_trials", "min_val_accuracy", "stop_trials", "anchors"},
    )
    trial = _only(data.get("trial", {}), "trial", {f.name for f in dataclasses.fields(_BUDGET)})
    storage = _only(data.get("storage", {}), "storage", {"heartbeat_interval", "grace_period"})
    search_raw = {**DEFAULT_SEARCH, **_only(data.get("search", {}), "search", set(PARAMS))}
    search = {name: _parse_param(name, value) for name, value in search_raw.items()}

    objective = _take(study, "objective", "study", _STUDY["objective"])
    if objective not in (*OBJECTIVES, GRID_OBJECTIVE):
        raise _fail("study.objective", f"{objective!r} is not one of {list(OBJECTIVES)}")
    n_trials = _take(study, "n_trials", "study", _STUDY["n_trials"])
    _at_least("study.n_trials", n_trials, 1)
    if n_trials > MAX_TRIALS:
        raise _fail(
            "study.n_trials", f"{n_trials} is more than a study can run (at most {MAX_TRIALS:,})"
        )
    min_acc = study.get("min_val_accuracy", _STUDY["min_val_accuracy"])
    if not _is_number(min_acc) or not 0 <= min_acc < 1:
        raise _fail(
            "study.min_val_accuracy",
            f"must be a number in [0, 1) (0 keeps every trial), got {min_acc!r}",
        )
    values = {
        f.name: _take(trial, f.name, "trial", getattr(_BUDGET, f.name))
        for f in dataclasses.fields(_BUDGET)
    }
    if values["dataset"] not in DATASETS and not is_arrays(values["dataset"]):
        raise _fail(
            "trial.dataset",
            f"{values['dataset']!r} is not one of {list(DATASETS)} nor the path of an .npz file",
        )
    for key in ("epochs", "batch_size", "val_size"):
        if values[key] is not None:
            _at_least(
                f"trial.{key}",
                values[key],
                0 if key == "val_size" and objective == GRID_OBJECTIVE else 1,
            )
    if values["epochs"] > MAX_EPOCHS:
        raise _fail(
            "trial.epochs",
            f"{values['epochs']} epochs would not end in a lifetime (at most {MAX_EPOCHS:,})",
        )
    seconds = values["checkpoint_seconds"]
    if not _is_number(seconds) or seconds < 0:
        raise _fail(
            "trial.checkpoint_seconds",
            f"must be a number of seconds >= 0 (0: no saved states), got {seconds!r}",
        )
    if values["precision"] not in PRECISIONS:
        raise _fail("trial.precision", f"{values['precision']!r} is not one of {list(PRECISIONS)}")
    if values["train_size"] is not None:
        _at_least("trial.train_size", values["train_size"], 0)  # 0: every training image
    interval = _take(storage, "heartbeat_interval", "storage", StorageSettings.heartbeat_interval)
    _at_least("storage.heartbeat_interval", interval, 1)
    grace = _take(storage, "grace_period", "storage", StorageSettings.grace_period)
    if grace is not None and grace <= interval:
        raise _fail("storage.grace_period", f"{grace} must exceed heartbeat_interval ({interval})")
    stop = _take(study, "stop_trials", "study", _STUDY["stop_trials"])
    if objective != GRID_OBJECTIVE:
        stop_rule(stop, objective)  # refuses what cannot work
    anchors = _take(study, "anchors", "study", _STUDY["anchors"])
    _at_least("study.anchors", anchors, 0)
    return StudyConfig(
        stop_trials=stop,
        anchors=anchors,
        search=search,
        trial=TrialBudget(**values),
        objective=objective,
        n_trials=n_trials,
        min_val_accuracy=float(min_acc),
        heartbeat_interval=interval,
        grace_period=grace,
    )


def load_config(path: Path | None) -> StudyConfig:
    """Read a TOML study config; ``None`` gives the built-in defaults."""
    if path is None:
        return parse_config({})
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    try:
        config = parse_config(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    if config.objective == GRID_OBJECTIVE:
        raise ConfigError(
            f"{path}: study.objective: {GRID_OBJECTIVE!r} is set by `tauopt reproduce`; a study "
            f"of your own is one of {list(OBJECTIVES)}"
        )
    return config
