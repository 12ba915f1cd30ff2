"""Turn an Optuna trial into a frozen TrainConfig, and a TrainResult into what Optuna optimises."""

from __future__ import annotations

from typing import Any, Literal

import optuna

from tauopt.engine import TrainConfig, TrainResult
from tauopt.errors import ConfigError
from tauopt.study._config import GRID_OBJECTIVE, SearchParam, StudyConfig

#: Names of the objective values, in order, per study objective.
METRIC_NAMES: dict[str, list[str]] = {
    "pareto": ["val_accuracy", "active_params"],
    "accuracy": ["val_accuracy"],
    GRID_OBJECTIVE: ["test_accuracy"],
}
DIRECTIONS: dict[str, list[Literal["minimize", "maximize"]]] = {
    "pareto": ["maximize", "minimize"],
    "accuracy": ["maximize"],
    GRID_OBJECTIVE: ["maximize"],
}


def _suggest(trial: optuna.Trial, param: SearchParam) -> Any:
    if param.choices is not None:
        return trial.suggest_categorical(param.name, list(param.choices))
    if param.low is None or param.high is None:
        return param.fixed
    if param.off:  # off is a value of its own, on a log range
        if not trial.suggest_categorical(f"{param.name}_on", [False, True]):
            return 0.0
        low, high = param.on_range
        return trial.suggest_float(param.name, low, high, log=True)
    if param.kind == "int":
        return trial.suggest_int(param.name, int(param.low), int(param.high), log=param.log)
    return trial.suggest_float(param.name, float(param.low), float(param.high), log=param.log)


#: The order of the training batches, the same for every trial of a study: any trials of one
#: shape can then train together (``tauopt worker --batch-trials``) with the results they would
#: have alone, and trials differ by their hyperparameters and initialisation, not their batches.
STUDY_DATA_SEED = 0


def suggest_config(trial: optuna.Trial, config: StudyConfig, *, seed: int) -> TrainConfig:
    """The training configuration of ``trial``; conditional names are asked only where they apply.

    ``gamma`` only for the fractional network, ``layer_prune_eps`` and ``prune_rule`` only for
    the ResNet (a fractional block is never an identity map), ``horizon_weight`` only with the
    penalty.
    """
    search = config.search
    arch = _suggest(trial, search["arch"])
    time_reg = _suggest(trial, search["time_reg"])
    taus = _suggest(trial, search["taus"])
    resnet = arch == "resnet"
    budget = config.trial
    return TrainConfig(
        arch=arch,
        dataset=budget.dataset,
        epochs=budget.epochs,
        train_size=budget.train_images,
        batch_size=budget.batch_size,
        val_size=budget.val_size,
        normalize=budget.normalize,
        precision=budget.precision,
        seed=seed,
        data_seed=STUDY_DATA_SEED,
        T=_suggest(trial, search["T"]),
        lr=_suggest(trial, search["lr"]),
        l1=_suggest(trial, search["l1"]),
        depth=_suggest(trial, search["depth"]),
        width=_suggest(trial, search["width"]),
        gamma=_suggest(trial, search["gamma"]) if not resnet else TrainConfig.gamma,
        prune_eps=_suggest(trial, search["layer_prune_eps"]) if resnet else None,
        prune_rule=_suggest(trial, search["prune_rule"]) if resnet else TrainConfig.prune_rule,
        horizon_weight=_suggest(trial, search["horizon_weight"]) if time_reg == "penalty" else 0.0,
        dependent_last_tau=time_reg == "dependent",
        projected_last_tau=time_reg == "projected",
        fixed_tau=taus == "fixed",
        fixed_input_tau=taus == "input-fixed",
    )


def objective_values(result: TrainResult, objective: str) -> list[float]:
    """What Optuna optimises: final validation accuracy, and (Pareto) the parameters left; a
    grid run of ``tauopt reproduce``, which selects nothing, tells its final test accuracy."""
    if objective == GRID_OBJECTIVE:
        return [result.test_accuracy]
    if not result.history.val_accuracy:
        raise ConfigError("a search study selects on validation accuracy: give val_size >= 1")
    values = [result.history.val_accuracy[-1]]
    if objective == "pareto":
        values.append(float(result.active_params))
    return values
