"""Study configuration files: shapes, defaults, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tauopt.errors import ConfigError
from tauopt.study import DEFAULT_SEARCH, load_config, parse_config


def test_defaults_search_everything_the_issue_names() -> None:
    config = parse_config({})
    assert set(config.search) == set(DEFAULT_SEARCH)
    assert config.objective == "pareto" and config.n_trials >= 1
    # the front is made by pruning and the time regularisation: the reference architecture
    # is fixed, the regularisation and the pruning threshold are searched
    assert config.search["arch"].fixed == "resnet"
    assert (config.search["depth"].fixed, config.search["width"].fixed) == (6, 100)
    for name in ("T", "l1", "layer_prune_eps", "lr"):
        assert config.search[name].low is not None, name
    assert config.search["time_reg"].choices == ("none", "penalty", "dependent")
    assert config.search["l1"].low == 0.0  # l1 = 0 is inside the range
    assert config.min_val_accuracy == 0.5


def test_file_with_range_choices_and_fixed_values(tmp_path: Path) -> None:
    path = tmp_path / "study.toml"
    path.write_text(
        """
[study]
objective = "accuracy"
n_trials = 7

[search]
T = [0.5, 10.0]
arch = ["resnet"]
width = 100
depth = [4, 6, 8]
lr = 0.05

[trial]
dataset = "fashion-mnist"
epochs = 2
train_size = 1000

[storage]
heartbeat_interval = 2
grace_period = 5
"""
    )
    config = load_config(path)
    assert config.objective == "accuracy" and config.n_trials == 7
    assert (config.search["T"].low, config.search["T"].high, config.search["T"].log) == (
        0.5,
        10.0,
        True,
    )
    assert config.search["width"].fixed == 100
    assert config.search["depth"].choices == (4, 6, 8)
    assert config.trial.dataset == "fashion-mnist" and config.trial.train_size == 1000
    assert (config.heartbeat_interval, config.grace_period) == (2, 5)
    # the stored form round-trips: every worker rebuilds the same config from the study
    assert parse_config(config.to_dict()) == config


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"search": {"T": [5.0, 1.0]}}, "search.T: low 5.0 must be below high 1.0"),
        ({"search": {"T": [0.0, 1.0]}}, "search.T: 0.0 must be > 0.0"),
        ({"search": {"depth": [2.5, 4]}}, "search.depth: expected an integer"),
        ({"search": {"arch": ["resnet", "vgg"]}}, "search.arch: 'vgg' is not one of"),
        ({"search": {"layer_prune_eps": [0.1, 1.0]}}, "search.layer_prune_eps: 1.0 must be < 1.0"),
        ({"search": {"momentum": 0.9}}, "search.momentum: unknown key"),
        ({"search": {"lr": []}}, "search.lr: an empty list"),
        ({"trial": {"epochs": 0}}, "trial.epochs: must be an integer >= 1"),
        ({"trial": {"dataset": "imagenet"}}, "trial.dataset: 'imagenet' is not one of"),
        ({"trial": {"batch": 10}}, "trial.batch: unknown key"),
        ({"trial": {"precision": "float16"}}, "trial.precision: 'float16' is not one of"),
        ({"study": {"objective": "loss"}}, "study.objective: 'loss' is not one of"),
        (
            {"storage": {"heartbeat_interval": 5, "grace_period": 5}},
            "storage.grace_period: 5 must exceed",
        ),
        ({"workers": {}}, "config.workers: unknown key"),
        ({"study": {"anchors": -1}}, "study.anchors: must be an integer >= 0"),
        ({"study": {"anchors": 1.5}}, "study.anchors: expected an integer"),
    ],
)
def test_invalid_values_are_rejected_with_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        parse_config(data)


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[search\nT = 1")
    with pytest.raises(ConfigError, match=r"broken\.toml is not valid TOML"):
        load_config(path)


def test_overrides_are_validated() -> None:
    config = parse_config({}).with_overrides(n_trials=3, epochs=1, train_size=None)
    assert (config.n_trials, config.trial.epochs) == (3, 1)
    with pytest.raises(ConfigError, match=r"study\.n_trials"):
        parse_config({}).with_overrides(n_trials=0)
