"""The papers' experiments as one study: a grid of fixed training runs, enqueued once, that
any number of workers run like any other trials.

Two protocols. ``authors`` is the grid of the papers' published code
(frederikkoehne/time_variable_learning, ``main.py``): per dataset and seed, 22 ResNet runs
and 12 Fractional DNN runs, 200 epochs on all 60,000 training images, test accuracy after
every epoch. ``tauopt`` is a wider grid on tauopt's own variants (the horizon as a gradient
constraint, pruning every block under the threshold, full memory gradients). ``t-vs-lr`` holds
``lr * T`` fixed across T; ``lr-matched`` trains fixed, input-fixed and trainable taus at
several learning rates, to tell trainable taus from a larger step. Every run has coordinates:
the factors that tell it from the others, which the report pairs runs by.

A seed draws everything random about a run: its initial weights, the order of its batches
and its validation split (from three seeds derived from it). The runs of one seed share all
three, so that runs that differ in one factor are paired, and runs of one seed and shape train
together as a population; runs of different seeds are independent replicates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import optuna

from tauopt.engine import TrainConfig
from tauopt.errors import ConfigError
from tauopt.storage import StorageSettings, access, storage_of, study_id, trial_id
from tauopt.study._config import parse_config
from tauopt.study._create import create_study
from tauopt.study._record import DUPLICATE_ATTR, GRID_CONFIG_ATTR, GRID_ID_ATTR, GRID_POINT_ATTR

#: Study user attribute: the grid's settings, and whether every run is enqueued.
REPRODUCE_ATTR = "tauopt_reproduce"
PROTOCOLS: tuple[str, ...] = ("authors", "tauopt", "t-vs-lr", "lr-matched")
DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist")
DEPTH = 6
#: The settings each protocol is run at unless ``--epochs`` / ``--train-size`` scale it down.
DEFAULT_EPOCHS = {"authors": 200, "tauopt": 5, "t-vs-lr": 10, "lr-matched": 200}
DEFAULT_TRAIN_SIZE: dict[str, int | None] = {
    "authors": None,
    "tauopt": 10_000,
    "t-vs-lr": 10_000,
    "lr-matched": None,
}
#: Held-out validation images: none in the papers' code (it trains on all 60,000);
#: ``lr-matched`` selects each arm's learning rate on them.
VAL_SIZE = {"authors": 0, "tauopt": 10_000, "t-vs-lr": 0, "lr-matched": 10_000}
#: ``t-vs-lr``: T in {1, 6} at each of these products lr * T (the papers' lr is 0.01 at T = 1).
LR_TIMES_T = (0.01, 0.06)
#: ``lr-matched``: the learning rates of every arm at T = 1 (at T = 6, the papers' 0.01 only).
MATCHED_RATES = (0.01, 0.03, 0.1)
#: Which taus train, per arm: all, none, or all but the input block's (the papers' code's
#: "fixed" ResNet).
TAU_ARMS = ("trainable", "fixed", "input-fixed")
#: A seed's batch order and validation split come from these offsets plus the seed, so that
#: the three draws of a run (weights, order, split) use three different seeds.
ORDER_SEED_BASE = 1_000
SPLIT_SEED_BASE = 2_000


@dataclass(frozen=True)
class _Protocol:
    l1: float  # weight of sum|tau| where l1 is on
    horizon_weight: float  # weight of (sum(tau) - T)^2 where the penalty is on
    prune_eps: float
    prune_rule: str
    last_tau: str  # how the grid's exact horizon is kept: "projected" or "dependent"
    rates: tuple[float, ...] = MATCHED_RATES  # lr-matched: the learning rates at T = 1


_PROTOCOLS = {
    # main.py: l1_reg_for_taus 0.01, tau_l2_factor 0.5; experiments.py: prune_network(crit=.01)
    # removes the smallest block once per epoch; the dependent tau is overwritten after each
    # step; the FracDNN's memory coefficients are computed under no_grad.
    "authors": _Protocol(0.01, 0.5, 0.01, "smallest", "projected"),
    "tauopt": _Protocol(0.01, 0.01, 0.05, "all", "dependent"),
    "t-vs-lr": _Protocol(0.0, 0.0, 0.01, "smallest", "projected"),
    "lr-matched": _Protocol(0.0, 0.0, 0.01, "smallest", "projected"),
}


@dataclass(frozen=True)
class GridRun:
    """One run of the grid: where it sits (``coords``) and what it trains (``config``)."""

    coords: dict[str, Any]
    config: TrainConfig

    @property
    def key(self) -> str:
        """A stable name of the run, unique in its grid."""
        return json.dumps(self.coords, sort_keys=True)


def _coords(
    protocol: str,
    config: TrainConfig,
    *,
    last_tau: str = "free",
) -> dict[str, Any]:
    memory = None if config.arch == "resnet" else ("detached" if config.detach_memory else "full")
    pruning = "off" if config.prune_eps is None else config.prune_rule
    return {
        "protocol": protocol,
        "dataset": config.dataset,
        "arch": config.arch,
        "seed": config.seed,
        "T": config.T,
        "taus": tau_arm(config),
        "l1": config.l1,
        "horizon_weight": config.horizon_weight,
        "last_tau": last_tau,
        "pruning": pruning,
        "memory": memory,
    }


def tau_arm(config: TrainConfig) -> str:
    """Which of :data:`TAU_ARMS` ``config`` trains."""
    if config.fixed_tau:
        return "fixed"
    return "input-fixed" if config.fixed_input_tau else "trainable"


def _arm(config: TrainConfig, arm: str) -> TrainConfig:
    return config.replace(fixed_tau=arm == "fixed", fixed_input_tau=arm == "input-fixed")


def _run(protocol: str, config: TrainConfig, *, last_tau: str = "free") -> GridRun:
    return GridRun(_coords(protocol, config, last_tau=last_tau), config)


def _authors(base: TrainConfig, p: _Protocol) -> Iterator[GridRun]:
    """``main.py``'s ``is_of_interest``: fixed taus without penalties (x pruning for the
    ResNet), trainable taus with l1 x penalty (x pruning), the dependent last tau alone. The
    ResNet's fixed taus both ways: every tau fixed, and the input block's alone (what
    ``experiments.py`` builds with ``tau_is_trainable=False``: its hidden taus train)."""
    resnet = base.arch == "resnet"
    prunes = (None, p.prune_eps) if resnet else (None,)
    fixed_arms = ("fixed", "input-fixed") if resnet else ("fixed",)
    for T in (1.0, float(DEPTH)):
        at = base.replace(T=T, prune_rule=p.prune_rule)
        for arm, eps in itertools.product(fixed_arms, prunes):
            yield _run("authors", _arm(at, arm).replace(prune_eps=eps))
        for l1, penalty, eps in itertools.product((0.0, p.l1), (0.0, p.horizon_weight), prunes):
            yield _run("authors", at.replace(l1=l1, horizon_weight=penalty, prune_eps=eps))
        yield _run("authors", at.replace(projected_last_tau=True), last_tau="projected")


def _tauopt(base: TrainConfig, p: _Protocol) -> Iterator[GridRun]:
    """Fixed taus; trainable taus with l1 off/on x time regularisation (none, penalty,
    dependent last tau) x pruning off/on (ResNet) or full/detached memory (FracDNN)."""
    for T in (1.0, float(DEPTH)):
        at = base.replace(T=T, prune_rule=p.prune_rule)
        yield _run("tauopt", at.replace(fixed_tau=True))
        variants: list[dict[str, Any]] = (
            [{}, {"prune_eps": p.prune_eps}]
            if base.arch == "resnet"
            else [{}, {"detach_memory": True}]
        )
        for l1, reg, variant in itertools.product(
            (0.0, p.l1), ("none", "penalty", "dependent"), variants
        ):
            config = at.replace(
                l1=l1,
                horizon_weight=p.horizon_weight if reg == "penalty" else 0.0,
                dependent_last_tau=reg == "dependent",
                **variant,
            )
            yield _run("tauopt", config, last_tau="dependent" if reg == "dependent" else "free")


def _t_vs_lr(base: TrainConfig, p: _Protocol) -> Iterator[GridRun]:
    """Trainable taus, nothing else on, T in {1, 6} at equal products lr * T: a step size
    scales its block's update as a learning rate does, so this tells what T does beyond
    that. The coordinate is ``lr_T`` (no ``lr``): runs that differ in T alone pair up."""
    for T, product in itertools.product((1.0, float(DEPTH)), LR_TIMES_T):
        config = base.replace(T=T, lr=product / T, prune_rule=p.prune_rule)
        coords = {**_coords("t-vs-lr", config), "lr_T": product}
        yield GridRun(coords, config)


def _lr_matched(base: TrainConfig, p: _Protocol) -> Iterator[GridRun]:
    """The ResNet, nothing else on: every arm of :data:`TAU_ARMS` at each of
    :data:`MATCHED_RATES` at T = 1, and at the papers' lr at T = 6. Trainable taus grow far
    above their initial T / 6, so at one learning rate "trainable beats fixed" may be "a
    larger step beats a smaller one": each arm at its own best rate tells them apart. The
    coordinate ``lr`` pairs the arms at each rate."""
    if base.arch != "resnet":
        return
    for T, rates in ((1.0, p.rates), (float(DEPTH), tuple(r for r in p.rates if r == 0.01))):
        for arm, lr in itertools.product(TAU_ARMS, rates):
            config = _arm(base, arm).replace(T=T, lr=lr, prune_rule=p.prune_rule)
            yield GridRun({**_coords("lr-matched", config), "lr": lr}, config)


#: Named parts of a grid, to run only those (``tauopt reproduce --only``).
CELLS: dict[str, Callable[[dict[str, Any]], bool]] = {
    # fixed against trainable taus, nothing else on
    "fixed-vs-trainable": lambda c: (
        c["l1"] == 0.0
        and c["horizon_weight"] == 0.0
        and c["last_tau"] == "free"
        and c["pruning"] == "off"
    ),
    # the ResNet with l1, pruning off against on
    "pruning": lambda c: (
        c["arch"] == "resnet"
        and c["taus"] == "trainable"
        and c["l1"] > 0.0
        and c["horizon_weight"] == 0.0
        and c["last_tau"] == "free"
    ),
}


def grid(
    *,
    protocol: str = "authors",
    epochs: int | None = None,
    train_size: int | None = None,
    seeds: int = 1,
    first_seed: int = 0,
    datasets: tuple[str, ...] = DATASETS,
    only: tuple[str, ...] = (),
    rates: tuple[float, ...] | None = None,
) -> list[GridRun]:
    """Every run of ``protocol``'s grid for the seeds ``first_seed .. first_seed + seeds - 1``
    (76 per seed for ``authors``, 104 for ``tauopt`` and 24 for ``lr-matched`` with both
    datasets), or only the runs of the named ``only`` cells. ``epochs`` and ``train_size``
    default to the protocol's (see :data:`DEFAULT_EPOCHS`). ``rates`` replaces the
    ``lr-matched`` grid's learning rates at T = 1 (its T = 6 runs come with 0.01 only). A grid
    may run in parts, one study per range of seeds or of rates: ``tauopt report`` reads
    several studies as one."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    unknown = sorted(set(only) - set(CELLS))
    if unknown:
        raise ConfigError(f"unknown cell {unknown[0]!r}: choose from {', '.join(CELLS)}")
    spec = _PROTOCOLS[protocol]
    if rates is not None:
        if protocol != "lr-matched":
            raise ConfigError(f"rates apply to the lr-matched protocol only, not {protocol!r}")
        bad = [r for r in rates if not (isinstance(r, float) and math.isfinite(r) and r > 0)]
        if bad or not rates:
            raise ConfigError(f"rates must be positive learning rates, got {list(rates)}")
        spec = dataclasses.replace(spec, rates=tuple(sorted(set(rates))))
    make = {
        "authors": _authors,
        "tauopt": _tauopt,
        "t-vs-lr": _t_vs_lr,
        "lr-matched": _lr_matched,
    }[protocol]
    runs: list[GridRun] = []
    seed_range = range(first_seed, first_seed + seeds)
    for dataset, arch, seed in itertools.product(datasets, ("resnet", "fracdnn"), seed_range):
        base = TrainConfig(
            arch=arch,  # type: ignore[arg-type]
            dataset=dataset,
            epochs=epochs or DEFAULT_EPOCHS[protocol],
            train_size=train_size if train_size is not None else DEFAULT_TRAIN_SIZE[protocol],
            val_size=VAL_SIZE[protocol],
            depth=DEPTH,
            # the seed draws the weights, the batch order and the split: the runs of one
            # seed are paired (and train together), seeds are independent replicates
            seed=seed,
            data_seed=ORDER_SEED_BASE + seed,
            split_seed=SPLIT_SEED_BASE + seed,
            detach_memory=arch == "fracdnn" and protocol in ("authors", "t-vs-lr"),
        )
        runs += [r for r in make(base, spec) if not only or any(CELLS[c](r.coords) for c in only)]
    # Runs of one shape and seed next to each other: a worker that claims several at once
    # (--batch-trials) then trains them as one population.
    runs.sort(key=lambda r: (r.config.dataset, r.config.seed, r.config.arch))
    return runs


def factor_choices(runs: list[GridRun]) -> dict[str, list[Any]]:
    """Every coordinate's values in the grid: the distributions its runs are stored with, so
    that the dashboard lists a run's settings as its parameters and can rank them."""
    names = list(runs[0].coords) if runs else []
    return {
        name: sorted({r.coords[name] for r in runs}, key=lambda v: (v is None, str(type(v)), v))
        for name in names
    }


def enqueue_grid(
    settings: StorageSettings,
    study_name: str,
    runs: list[GridRun],
    spec: dict[str, Any],
) -> tuple[optuna.Study, int]:
    """Create the study and enqueue ``runs``, each exactly once, however often and from however
    many processes this is called, and wherever an earlier call was interrupted (every run is
    enqueued under the study's lock, skipping those already there). A study made with another
    ``spec`` is refused. Returns the study and how many runs this call enqueued."""
    if not runs:
        raise ConfigError("the grid is empty: check --only and --datasets")
    spec = {**spec, "runs": len(runs), "choices": factor_choices(runs)}
    config = parse_config(
        {
            "study": {"objective": "grid", "n_trials": len(runs), "min_val_accuracy": 0.0},
            "trial": {
                "dataset": runs[0].config.dataset,
                "epochs": runs[0].config.epochs,
                **({"train_size": runs[0].config.train_size} if runs[0].config.train_size else {}),
            },
        }
    )
    study = create_study(settings, study_name, config)
    storage = storage_of(study)
    with access(storage).lock(study_name):
        stored = storage.get_study_user_attrs(study_id(study)).get(REPRODUCE_ATTR)
        if stored is not None and stored["spec"] != spec:
            raise ConfigError(
                f"study {study_name!r} holds a grid made with {_short(stored['spec'])}, not "
                f"{_short(spec)}; choose another --study name"
            )
        if stored is not None and stored["complete"]:
            return study, 0
        study.set_user_attr(REPRODUCE_ATTR, {"spec": spec, "complete": False})
        present = {t.user_attrs.get(GRID_ID_ATTR) for t in study.get_trials(deepcopy=False)}
        missing = [r for r in runs if r.key not in present]
        for run in missing:
            study.enqueue_trial(
                params=run.coords,
                user_attrs={
                    GRID_CONFIG_ATTR: run.config.to_dict(),
                    GRID_POINT_ATTR: run.coords,
                    GRID_ID_ATTR: run.key,
                },
                skip_if_exists=False,
            )
        study.set_user_attr(REPRODUCE_ATTR, {"spec": spec, "complete": True})
    if not access(storage).locks:
        _drop_duplicates(study, storage)
    return study, len(missing)


def _drop_duplicates(study: optuna.Study, storage: optuna.storages.BaseStorage) -> None:
    """Without a lock (through the proxy), processes that enqueue at the same moment can both
    add a run: the first of each run stays, a waiting copy is failed (it uses no budget)."""
    first: dict[str, int] = {}
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        key = t.user_attrs.get(GRID_ID_ATTR)
        if key is None or first.setdefault(key, t.number) == t.number:
            continue
        if t.state == optuna.trial.TrialState.WAITING:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                storage.set_trial_user_attr(trial_id(t), DUPLICATE_ATTR, first[key])
                storage.set_trial_state_values(trial_id(t), state=optuna.trial.TrialState.FAIL)


def _short(spec: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in spec.items() if k != "choices")
