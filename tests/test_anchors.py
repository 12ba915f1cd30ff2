"""Anchor trials: where a Pareto study's first trials sit, and that ``create`` enqueues them
once, within the budget, on a new study only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import tomllib
from optuna.trial import TrialState

from tauopt._cli import main
from tauopt.study import load_study, parse_config
from tauopt.study._anchors import anchor_params

SMALL = """
[study]
min_val_accuracy = 0.0  # tiny trials: keep every one feasible
[search]
arch = ["resnet", "fracdnn"]
lr = [0.1, 0.4]
layer_prune_eps = [0.05, 0.3]
time_reg = ["penalty", "none"]
depth = 3
width = 16
[trial]
epochs = 1
train_size = 500
val_size = 500
"""


def test_default_anchors_sit_at_the_highest_eps_with_large_learning_rates() -> None:
    anchors = anchor_params(parse_config({}))
    # lr in [0.01, 0.3] on a log scale, the middles of three equal parts of its upper half:
    # 0.01 * 30 ** (7/12, 9/12, 11/12); the default arch is fixed to the ResNet, so it is not
    # enqueued
    assert anchors == [
        {"layer_prune_eps": 0.2, "time_reg": "none", "lr": 0.07272},
        {"layer_prune_eps": 0.2, "time_reg": "none", "lr": 0.128186},
        {"layer_prune_eps": 0.2, "time_reg": "none", "lr": 0.225958},
    ]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # 0.1 * 3 ** (7/12, 9/12, 11/12); choices of eps and lr; the ResNet picked among the
        # architectures
        (
            {"search": {"arch": ["fracdnn", "resnet"], "lr": [0.1, 0.3], "layer_prune_eps": 0.1}},
            [
                {"arch": "resnet", "time_reg": "none", "lr": v}
                for v in (0.189811, 0.227951, 0.273754)
            ],
        ),
        (
            {
                "study": {"anchors": 2},
                "search": {"lr": [0.3, 0.1, 0.2], "layer_prune_eps": [0.1, 0.25, 0.2]},
            },
            [{"layer_prune_eps": 0.25, "time_reg": "none", "lr": v} for v in (0.2, 0.3)],
        ),
        # no "none" to choose: the time regularisation is drawn; lr fixed: nothing to spread
        (
            {"study": {"anchors": 1}, "search": {"time_reg": ["penalty", "dependent"], "lr": 0.1}},
            [{"layer_prune_eps": 0.2}],
        ),
        # never more than the budget
        ({"study": {"n_trials": 2}}, 2),
        # nothing prunes, a single objective, or switched off: none
        ({"search": {"arch": "fracdnn"}}, 0),
        ({"search": {"arch": ["fracdnn"]}}, 0),
        ({"study": {"objective": "accuracy"}}, 0),
        ({"study": {"anchors": 0}}, 0),
    ],
)
def test_anchors_follow_the_search_space(data: dict[str, Any], expected: Any) -> None:
    anchors = anchor_params(parse_config(data))
    if isinstance(expected, int):
        assert len(anchors) == expected
    else:
        assert anchors == expected


def _anchors(study: optuna.Study) -> list[int]:
    return sorted(t.user_attrs["anchor"] for t in study.get_trials() if "anchor" in t.user_attrs)


def test_create_enqueues_the_anchors_once_and_workers_run_them_first(
    workdir: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["create", "--config", "small.toml", "--n-trials", "4"]) == 0
    assert main(["create", "--config", "small.toml", "--n-trials", "5"]) == 0  # no second set
    study = load_study(None, "tauopt")
    expected = anchor_params(parse_config(_small(n_trials=4)))
    assert _anchors(study) == [0, 1, 2] and len(expected) == 3
    assert [t.state for t in study.get_trials()] == [TrialState.WAITING] * 3
    capsys.readouterr()
    assert main(["worker", "--data-dir", str(data_dir)]) == 0
    said = capsys.readouterr().err
    # the worker says which trials were placed
    assert [f"trial {n} complete [{n + 1}/5] (an anchor)" in said for n in range(5)] == [
        True, True, True, False, False
    ]  # fmt: skip
    trials = load_study(None, "tauopt").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    for t, params in zip(trials[:3], expected, strict=True):
        assert t.user_attrs["anchor"] == trials.index(t)
        assert {k: t.params[k] for k in params} == params  # trained with the anchor's values
        assert t.user_attrs["train_config"]["prune_eps"] == 0.3
    assert all("anchor" not in t.user_attrs for t in trials[3:])  # then the sampler's draws


def test_anchors_never_exceed_the_budget(workdir: Path) -> None:
    assert main(["create", "--config", "small.toml", "--n-trials", "2"]) == 0
    assert main(["create", "--config", "small.toml", "--n-trials", "6"]) == 0
    study = load_study(None, "tauopt")
    assert _anchors(study) == [0, 1] and len(study.get_trials()) == 2


def test_a_create_that_failed_halfway_enqueues_the_rest(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The database drops the connection between two anchors: ``create`` retries, and the
    retry adds the missing anchors, not a second set."""
    import sqlalchemy.exc

    real, calls = optuna.Study.enqueue_trial, []

    def flaky(self: optuna.Study, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise sqlalchemy.exc.OperationalError(
                "INSERT", {}, Exception("server closed the connection unexpectedly")
            )
        real(self, *args, **kwargs)

    monkeypatch.setattr(optuna.Study, "enqueue_trial", flaky)
    assert main(["create", "--config", "small.toml", "--n-trials", "4"]) == 0
    assert "storage error while creating the study" in capsys.readouterr().err
    study = load_study(None, "tauopt")
    assert _anchors(study) == [0, 1, 2] and len(study.get_trials()) == 3
    assert study.user_attrs["tauopt_anchors"]["complete"] is True


def test_a_study_made_before_anchors_gets_none(workdir: Path) -> None:
    """A study an older tauopt made (its stored config has no ``anchors``): a later ``create``
    that raises its budget adds none to it."""
    url = f"sqlite:///{workdir / 'tauopt.db'}"
    study = optuna.create_study(
        storage=url, study_name="tauopt", directions=["maximize", "minimize"]
    )
    stored = parse_config(_small(n_trials=3)).to_dict()
    del stored["study"]["anchors"]
    study.set_user_attr("tauopt_config", stored)
    assert main(["create", "--config", "small.toml", "--n-trials", "5"]) == 0
    study = load_study(url, "tauopt")
    assert study.get_trials() == [] and study.user_attrs["tauopt_config"]["study"]["n_trials"] == 5


def _small(n_trials: int) -> dict[str, Any]:
    data = tomllib.loads(SMALL)
    data["study"]["n_trials"] = n_trials
    return data
