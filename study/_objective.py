"""Turn an Optuna trial into a frozen TrainConfig, and a TrainResult into trial metrics."""

from __future__ import annotations

from typing import Any, Literal

import optuna

from tauopt.engine import TrainConfig, TrainResult
from tauopt.study._config import SearchParam, StudyConfig

#: Names of the objective values, in order, per study objective.
METRIC_NAMES: dict[str, list[str]] = {
    "pareto": ["val_accuracy", "active_params"],
    "accuracy": ["val_accuracy"],
}
DIRECTIONS: dict[str, list[Literal["minimize", "maximize"]]] = {
    "pareto": ["maximize", "minimize"],
    "accuracy": ["maximize"],
}


def _suggest(trial: optuna.Trial, param: SearchParam) -> Any:
    if param.choices is not None:
        return trial.suggest_categorical(param.name, list(param.choices))
    if param.low is None or param.high is None:
        return param.fixed
    if param.kind == "int":
        return trial.suggest_int(param.name, int(param.low), int(param.high), log=param.log)
    return trial.suggest_float(param.name, float(param.low), float(param.high), log=param.log)


#: The order of the training batches, the same for every trial of a study: any trials of one
#: shape can then train together (``tauopt worker --batch-trials``) with the results they would
#: have alone, and trials differ by their hyperparameters and initialisation, not their batches.
STUDY_DATA_SEED = 0


def suggest_config(trial: optuna.Trial, config: StudyConfig, *, seed: int) -> TrainConfig:
    """The training configuration of ``trial``; conditional names are asked only where they apply.

    ``gamma`` only for the fractional network, ``layer_prune_eps`` only for the ResNet (a
    fractional block is never an identity map), ``horizon_weight`` only with the penalty.
    """
    search = config.search
    arch = _suggest(trial, search["arch"])
    time_reg = _suggest(trial, search["time_reg"])
    budget = config.trial
    return TrainConfig(
        arch=arch,
        dataset=budget.dataset,
        epochs=budget.epochs,
        train_size=budget.train_size,
        batch_size=budget.batch_size,
        val_size=budget.val_size,
        seed=seed,
        data_seed=STUDY_DATA_SEED,
        T=_suggest(trial, search["T"]),
        lr=_suggest(trial, search["lr"]),
        l1=_suggest(trial, search["l1"]),
        depth=_suggest(trial, search["depth"]),
        width=_suggest(trial, search["width"]),
        gamma=_suggest(trial, search["gamma"]) if arch == "fracdnn" else TrainConfig.gamma,
        prune_eps=_suggest(trial, search["layer_prune_eps"]) if arch == "resnet" else None,
        horizon_weight=_suggest(trial, search["horizon_weight"]) if time_reg == "penalty" else 0.0,
        dependent_last_tau=time_reg == "dependent",
    )


def objective_values(result: TrainResult, objective: str) -> list[float]:
    """What Optuna optimises: final validation accuracy, and (Pareto) the parameters left."""
    values = [result.val_accuracy[-1]]
    if objective == "pareto":
        values.append(float(result.active_params))
    return values


def trial_attributes(result: TrainResult) -> dict[str, Any]:
    """Everything a user wants to see of a finished trial, JSON-ready."""
    return {
        "test_accuracy": result.test_accuracy,
        "val_accuracy": result.val_accuracy[-1],
        "val_accuracy_history": result.val_accuracy,
        "active_blocks": result.active_blocks,
        "active_block_ids": result.active_block_ids,
        "active_params": result.active_params,
        "initial_params": result.initial_params,
        "taus": result.taus,
        "tau_sum": sum(result.taus),
        "tau_history": result.tau_history,
        "pruned_layers": [vars(event) for event in result.pruned],
        "epoch_seconds": result.epoch_seconds,
        "test_accuracy_history": result.test_accuracy_history,
        "device": result.device,
        "seed": result.config.seed,
        "train_config": result.config.to_dict(),
    }
