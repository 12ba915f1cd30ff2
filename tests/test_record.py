"""A trial's record and its user attributes: the names stay those trials were stored under,
and trials stored before some keys existed still read."""

from __future__ import annotations

import copy
import math
from typing import Any

from tauopt.engine import History, PruneEvent, TrainConfig, parameter_count
from tauopt.study import GridPoint, TrialRecord

#: What ``TrialRecord.to_attrs`` wrote before the record held a TrainConfig and a History.
STORED: dict[str, Any] = {
    "train_config": {
        "arch": "resnet",
        "dataset": "mnist",
        "epochs": 2,
        "T": 1.0,
        "l1": 0.01,
        "horizon_weight": 0.0,
        "dependent_last_tau": False,
        "projected_last_tau": False,
        "prune_eps": 0.05,
        "prune_every": 1,
        "prune_rule": "all",
        "gamma": 0.5,
        "width": 100,
        "depth": 3,
        "lr": 0.01,
        "batch_size": 100,
        "seed": 4,
        "fixed_tau": False,
        "fixed_input_tau": False,
        "train_size": None,
        "val_size": None,
        "tau_min": 0.0001,
        "detach_memory": False,
        "normalize": False,
        "data_seed": None,
        "split_seed": None,
        "precision": "float32",
    },
    "test_accuracy": 0.91,
    "val_accuracy": 0.9,
    "active_blocks": 2,
    "active_params": 20410,
    "initial_params": 30510,
    "in_features": 784,
    "num_classes": 10,
    "taus": [0.5, 0.45],
    "device": "cpu",
    "active_block_ids": [0, 2],
    "val_accuracy_history": [0.85, 0.9],
    "test_accuracy_history": [0.86, 0.91],
    "train_accuracy_history": [0.8, 0.88],
    "train_loss_history": [0.7, 0.4],
    "clean_loss_history": [0.69, 0.39],
    "penalty_history": [{"l1": 0.01, "horizon": 0.0}, {"l1": 0.0095, "horizon": 0.0}],
    "tau_history": [[0.4, 0.3, 0.3], [0.5, 0.0, 0.45]],
    "pruned_layers": [{"epoch": 2, "position": 1, "block": 1}],
    "epoch_seconds": [1.5, 1.25],
    "model_artifact_id": "0123abcd-0000-4000-8000-000000000001",
    "machine": "cpu x2",
    "resumed_from": [{"epoch": 1, "batch": 0}],
    "tau_sum": 0.95,
    "seed": 4,
}
#: A trial of an early version: no shape, no initial parameters, fewer histories.
OLDER: dict[str, Any] = {
    "train_config": {"epochs": 2, "depth": 3, "l1": 0.01, "lr": 0.01, "seed": 1},
    "test_accuracy": 0.9,
    "val_accuracy": 0.88,
    "active_blocks": 3,
    "active_params": 30510,
    "taus": [0.3, 0.3, 0.4],
    "val_accuracy_history": [0.8, 0.88],
    "tau_history": [[0.3, 0.3, 0.4], [0.3, 0.3, 0.4]],
    "pruned_layers": [],
    "epoch_seconds": [1.0, 1.0],
    "tau_sum": 1.0,
}


def test_a_stored_trial_reads_back_into_the_record_and_writes_the_same_attributes() -> None:
    record = TrialRecord.from_attrs(copy.deepcopy(STORED))
    assert record.config == TrainConfig(**STORED["train_config"])
    h = record.history
    assert h.val_accuracy == [0.85, 0.9] and h.test_accuracy == [0.86, 0.91]
    assert h.train_accuracy == [0.8, 0.88] and h.train_loss == [0.7, 0.4]
    assert h.clean_loss == [0.69, 0.39] and h.penalties == STORED["penalty_history"]
    assert h.taus == STORED["tau_history"] and h.epoch_seconds == [1.5, 1.25]
    assert h.pruned == [PruneEvent(epoch=2, position=1, block=1)]
    assert h.resumed_from == [{"epoch": 1, "batch": 0}] and h.train_seconds == []
    assert record.train_accuracy == 0.88 and record.blocks_removed == 1
    assert record.model_artifact_id == STORED["model_artifact_id"] and record.seed == 4
    assert record.grid_point is None
    assert record.to_attrs() == STORED  # the same keys, the same values


def test_an_older_trial_reads_with_what_it_lacks_derived_or_empty() -> None:
    record = TrialRecord.from_attrs(copy.deepcopy(OLDER))
    config = TrainConfig(**OLDER["train_config"])
    assert record.config == config and (record.in_features, record.num_classes) == (784, 10)
    assert record.initial_params == parameter_count(config, 784, 10)
    assert record.history.val_accuracy == [0.8, 0.88] and record.history.train_loss == []
    assert record.history.test_accuracy == [] and record.history.resumed_from == []
    assert record.train_accuracy is None and record.device == "" and record.machine == ""
    attrs = record.to_attrs()
    assert set(attrs) == set(STORED)
    assert attrs["train_config"] == config.to_dict() and attrs["train_loss_history"] == []


def test_a_grid_run_reads_its_coordinates_in_their_order() -> None:
    coords = {"protocol": "lr-matched", "dataset": "mnist", "arch": "resnet", "seed": 2}
    coords |= {"T": 1.0, "taus": "fixed", "pruning": "off", "memory": None, "lr": 0.03}
    record = TrialRecord.from_attrs({**STORED, "grid_point": coords})
    point = record.grid_point
    assert point == GridPoint.of(coords) and point.as_dict() == coords
    assert list(point.as_dict()) == list(coords)
    assert (point.protocol, point.seed, point.T, point.taus, point.lr) == (
        "lr-matched",
        2,
        1.0,
        "fixed",
        0.03,
    )
    assert not point.prunes and point.memory is None and point.get("width") is None
    assert "grid_point" not in record.to_attrs()  # stored when the run is enqueued
    assert not TrialRecord.from_attrs(STORED).point  # a searched trial: no coordinates


def test_a_history_holds_one_list_per_metric_under_each_format_s_names() -> None:
    history = History(taus=[[0.5]], pruned=[PruneEvent(1, 0, 0)], train_seconds=[0.1])
    stored = history.to_names("stored")
    assert "train_seconds" not in stored and stored["pruned_layers"] == [
        {"epoch": 1, "position": 0, "block": 0}
    ]
    assert History.from_names(stored, "stored", strict=False) == History(
        taus=[[0.5]], pruned=[PruneEvent(1, 0, 0)]
    )
    assert not math.isnan(TrialRecord.from_attrs(STORED).final_val_accuracy)
