"""The papers' experiments as one study: a grid of fixed training runs, enqueued once, that
any number of workers run like any other trials."""

from __future__ import annotations

import itertools
from typing import Any

import optuna

from tauopt.engine import TrainConfig
from tauopt.engine._config import Arch
from tauopt.errors import StorageError
from tauopt.storage import StorageSettings, study_lock
from tauopt.study._config import parse_config
from tauopt.study._create import create_study
from tauopt.study._liveness import rdb_of

#: Trial user attributes of a grid point: its TrainConfig, and its coordinates in the grid.
GRID_CONFIG_ATTR = "grid_config"
GRID_POINT_ATTR = "grid_point"
#: Study user attribute, set once the grid is enqueued: the settings it was made with.
REPRODUCE_ATTR = "tauopt_reproduce"

DEPTH = 6
L1 = 0.01  # weight of sum|tau| where the grid turns the l1 penalty on
HORIZON_WEIGHT = 0.01  # weight of (sum(tau) - T)^2 where it turns the penalty on
DATASETS = ("mnist", "fashion-mnist")
PRUNE_EPS = 0.05  # ResNet blocks under 5 % of sum|tau| are removed, where pruning is on


def grid(
    *,
    epochs: int,
    train_size: int | None,
    seeds: int,
    datasets: tuple[str, ...] = DATASETS,
) -> list[tuple[dict[str, Any], TrainConfig]]:
    """Every run of the grid, with its coordinates.

    For each of ``datasets`` (default both), both networks and every seed: fixed taus (the
    baseline) for T in {1, depth}; trainable taus for T in {1, depth} x l1 off/on x time
    regularisation (none, horizon penalty, dependent last tau) x, for the ResNet, pruning
    off/on and, for the fractional network, memory gradients full/detached. The papers'
    reference setting otherwise: width 100, depth 6, SGD lr 0.01, batch 100.
    """
    points: list[tuple[dict[str, Any], TrainConfig]] = []
    archs: tuple[Arch, ...] = ("resnet", "fracdnn")
    for dataset, arch, seed in itertools.product(datasets, archs, range(seeds)):
        base = TrainConfig(
            arch=arch, dataset=dataset, epochs=epochs, train_size=train_size, depth=DEPTH, seed=seed
        )
        variants = ("no-prune", "prune") if arch == "resnet" else ("full", "detached")
        for T in (1.0, float(DEPTH)):
            point = {"dataset": dataset, "arch": arch, "seed": seed, "T": T}
            fixed = {**point, "tau": "fixed", "l1": False, "time_reg": "none"}
            points.append(({**fixed, "variant": variants[0]}, base.replace(T=T, fixed_tau=True)))
            for l1, time_reg, variant in itertools.product(
                (False, True), ("none", "penalty", "dependent"), variants
            ):
                config = base.replace(
                    T=T,
                    l1=L1 if l1 else 0.0,
                    horizon_weight=HORIZON_WEIGHT if time_reg == "penalty" else 0.0,
                    dependent_last_tau=time_reg == "dependent",
                    prune_eps=PRUNE_EPS if variant == "prune" else None,
                    detach_memory=variant == "detached",
                )
                coords = {
                    **point,
                    "tau": "trainable",
                    "l1": l1,
                    "time_reg": time_reg,
                    "variant": variant,
                }
                points.append((coords, config))
    return points


def enqueue_grid(
    settings: StorageSettings,
    study_name: str,
    *,
    epochs: int,
    train_size: int | None,
    seeds: int,
    datasets: tuple[str, ...] = DATASETS,
) -> tuple[optuna.Study, int]:
    """Create the study and enqueue the grid, exactly once: several processes may call this
    at the same moment, and a later call with the same settings enqueues nothing. Returns the
    study and how many trials this call enqueued."""
    if epochs < 1 or seeds < 1 or (train_size is not None and train_size < 1):
        raise StorageError(
            f"epochs, seeds and train size must be >= 1, got {epochs}, {seeds}, {train_size}"
        )
    unknown = sorted(set(datasets) - set(DATASETS))
    if unknown or not datasets:
        raise StorageError(f"datasets must be among {DATASETS}, got {list(datasets)}")
    points = grid(epochs=epochs, train_size=train_size, seeds=seeds, datasets=datasets)
    spec = {
        "epochs": epochs,
        "train_size": train_size,
        "seeds": seeds,
        "datasets": list(datasets),
        "points": len(points),
    }
    config = parse_config(
        {
            "study": {"objective": "accuracy", "n_trials": len(points), "min_val_accuracy": 0.0},
            "trial": {"epochs": epochs, **({"train_size": train_size} if train_size else {})},
        }
    )
    study = create_study(settings, study_name, config)
    storage = study._storage
    with study_lock(rdb_of(storage), study_name):
        stored = storage.get_study_user_attrs(study._study_id).get(REPRODUCE_ATTR)
        if stored is not None:
            if stored != spec:
                raise StorageError(
                    f"study {study_name!r} holds a grid made with {stored}, not {spec}; "
                    "choose another --study name"
                )
            return study, 0
        for coords, train_config in points:
            study.enqueue_trial(
                params={},
                user_attrs={GRID_CONFIG_ATTR: train_config.to_dict(), GRID_POINT_ATTR: coords},
                skip_if_exists=False,
            )
        study.set_user_attr(REPRODUCE_ATTR, spec)
    return study, len(points)
