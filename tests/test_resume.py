"""Trials that go on from a saved state: the engine's states and the study's files of them.

A run resumed on the same device and thread count, by the stepper it trained with (alone, or
the same population), gives bitwise the result of a run trained in one go; resumed by another
stepper (a population's member alone, members of other groups together) it agrees to the float
tolerance of a population against its members alone, and so does a run resumed on another
thread count. The worker tests, with real signals against SQLite and PostgreSQL, are in
``tests/test_preemption.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from tauopt._cli import main
from tauopt.engine import (
    PruneEvent,
    RawDataset,
    RunPausedError,
    RunState,
    TrainConfig,
    TrainResult,
    set_threads,
    train,
    train_population,
)
from tauopt.errors import ConfigError
from tauopt.study import WorkerOptions, parse_config
from tauopt.study import _liveness as liveness
from tauopt.study._liveness import WorkerStopped, stop_on_signals
from tauopt.study._record import progressed
from tauopt.study._resume import TrialIdentity, TrialStates, config_hash, dataset_hash

SMALL: dict[str, Any] = {"epochs": 5, "train_size": 1500, "val_size": 500, "data_seed": 3}
#: Every metric of a run but its timings: where it ended, and its history.
METRICS = (
    "test_accuracy",
    "taus",
    "active_blocks",
    "active_block_ids",
    "active_params",
    "initial_params",
)
HISTORY = (
    "val_accuracy",
    "test_accuracy",
    "train_accuracy",
    "train_loss",
    "clean_loss",
    "penalties",
    "taus",
    "pruned",
)


class Saves:
    """A :class:`tauopt.engine.Checkpointing` that keeps every state and asks for a stop once
    ``stop_after`` states were saved or ``stop_at_call`` questions were asked (that one is
    answered 0 s left: stop at the end of the current batch)."""

    def __init__(
        self,
        *,
        every: float = 1e-9,
        stop_after: int | None = None,
        stop_at_call: int | None = None,
    ) -> None:
        self.every, self.stop_after, self.stop_at_call = every, stop_after, stop_at_call
        self.saved: list[dict[int, RunState]] = []
        self.calls = 0

    def stop_in(self) -> float | None:
        self.calls += 1
        if self.stop_at_call is not None and self.calls >= self.stop_at_call:
            return 0.0
        if self.stop_after is not None and len(self.saved) >= self.stop_after:
            return 3600.0  # time enough to reach the epoch's end
        return None

    def save(self, states: Mapping[int, RunState]) -> None:
        self.saved.append(dict(states))


def _same(got: TrainResult | Exception, want: TrainResult | Exception) -> None:
    assert isinstance(got, TrainResult) and isinstance(want, TrainResult), (got, want)
    for name in METRICS:
        assert getattr(got, name) == getattr(want, name), name
    for name in HISTORY:
        assert getattr(got.history, name) == getattr(want.history, name), name
    mine, theirs = got.model.state_dict(), want.model.state_dict()
    assert list(mine) == list(theirs)
    for key, value in mine.items():
        assert torch.equal(value, theirs[key]), key


def _close(got: TrainResult | Exception, want: TrainResult | Exception) -> None:
    """The tolerance of a population against its members alone (``tests/test_population``)."""
    assert isinstance(got, TrainResult) and isinstance(want, TrainResult), (got, want)
    assert got.history.val_accuracy == pytest.approx(want.history.val_accuracy, abs=2e-3)
    assert got.test_accuracy == pytest.approx(want.test_accuracy, abs=2e-3)
    assert got.history.train_loss == pytest.approx(want.history.train_loss, rel=5e-4)
    assert got.taus == pytest.approx(want.taus, rel=5e-4, abs=1e-6)
    assert got.history.pruned == want.history.pruned and got.active_params == want.active_params


PRUNING = {"width": 32, "depth": 5, "lr": 0.1, "l1": 0.01, "T": 1.0}


@pytest.mark.parametrize(
    "changes",
    [
        {"prune_eps": 0.12},
        {"prune_eps": 0.12, "dependent_last_tau": True, "T": 2.0},
        {"precision": "bfloat16", "prune_eps": 0.12},
        {"arch": "fracdnn", "l1": 0.0, "gamma": 0.4},
        {"prune_eps": 0.12, "fixed_input_tau": True, "split_seed": 11},
    ],
    ids=["resnet", "dependent", "bfloat16", "fracdnn", "input-fixed"],
)
def test_a_run_resumed_at_an_epoch_or_after_any_batch_equals_one_trained_in_one_go(
    mnist: RawDataset, changes: dict[str, Any]
) -> None:
    config = TrainConfig(**{**SMALL, **PRUNING, **changes})
    whole = train(config, mnist, device="cpu")
    # at an epoch's end: a stop asked after two saves, the epoch's end within the time left
    at_epoch = Saves(stop_after=2)
    with pytest.raises(RunPausedError, match="state after epoch 3"):
        train(config, mnist, device="cpu", checkpoints=at_epoch)
    state = at_epoch.saved[-1][0]
    assert state.point == (3, 0) and len(state.record.val_accuracy) == 3
    resumed = train(config, mnist, device="cpu", resume=state)
    _same(resumed, whole)
    assert resumed.history.resumed_from == [{"epoch": 3, "batch": 0}]
    assert len(resumed.history.val_accuracy) == config.epochs  # no epoch twice, none missing
    # after a batch in the middle of epoch 2 (15 batches an epoch: 2 questions before it)
    mid = Saves(every=1e9, stop_at_call=22)
    with pytest.raises(RunPausedError, match="batch 6 of the next"):
        train(config, mnist, device="cpu", checkpoints=mid)
    (states,) = mid.saved
    assert states[0].point == (1, 6) and states[0].sums is not None
    _same(train(config, mnist, device="cpu", resume=states[0]), whole)
    # and a run resumed twice
    again = Saves(stop_after=1)
    with pytest.raises(RunPausedError):
        train(config, mnist, device="cpu", resume=states[0], checkpoints=again)
    last = again.saved[-1][0]
    assert last.point == (3, 0) and last.record.resumed_from == [{"epoch": 1, "batch": 6}]
    twice = train(config, mnist, device="cpu", resume=last)
    _same(twice, whole)
    assert twice.history.resumed_from == [{"epoch": 1, "batch": 6}, {"epoch": 3, "batch": 0}]


@pytest.fixture()
def threads() -> Iterator[None]:
    """The test may set the process's CPU threads; they are put back after it."""
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_a_run_resumed_on_another_thread_count_agrees_to_the_stated_tolerance(
    mnist: RawDataset, threads: None
) -> None:
    """Saved on 2 threads and resumed on 1 (at an epoch's end), saved on 1 and resumed on 2
    (after a batch): each against the run trained in one go on either count, to the
    tolerance of ``_close``. Bitwise is promised on one thread count only, so the tolerance
    is what is held even where the sums happen to agree."""
    config = TrainConfig(**{**SMALL, **PRUNING, "prune_eps": 0.12})
    whole: dict[int, TrainResult] = {}
    for count in (1, 2):
        set_threads(count)
        whole[count] = train(config, mnist, device="cpu")
    assert whole[1].history.pruned  # the pruning is held too
    _close(whole[2], whole[1])  # as two runs of the same config on the two counts agree
    cases = [(2, 1, Saves(stop_after=1), (2, 0)), (1, 2, Saves(every=1e9, stop_at_call=8), (0, 7))]
    for saved_on, resumed_on, saves, point in cases:
        set_threads(saved_on)
        with pytest.raises(RunPausedError):
            train(config, mnist, device="cpu", checkpoints=saves)
        state = saves.saved[-1][0]
        assert state.point == point
        set_threads(resumed_on)
        resumed = train(config, mnist, device="cpu", resume=state)
        assert resumed.history.resumed_from == [{"epoch": point[0], "batch": point[1]}]
        assert len(resumed.history.val_accuracy) == config.epochs
        for count in (saved_on, resumed_on):
            _close(resumed, whole[count])


def test_no_state_is_saved_when_checkpoints_are_off_and_a_stop_ends_the_run(
    mnist: RawDataset,
) -> None:
    config = TrainConfig(**{**SMALL, **PRUNING})
    off = Saves(every=0, stop_at_call=5)
    with pytest.raises(RunPausedError, match="nothing saved"):
        train(config, mnist, device="cpu", checkpoints=off)
    assert off.saved == []


GROUP = [
    {"seed": 1, "lr": 0.1, "l1": 0.02, "prune_eps": 0.19},
    {"seed": 2, "lr": 0.05, "l1": 0.01, "prune_eps": 0.1, "T": 2.0, "dependent_last_tau": True},
    {"seed": 3, "lr": 0.2},
    {"seed": 4, "lr": 0.1, "l1": 0.01, "prune_eps": 0.12, "T": 3.0, "horizon_weight": 0.05},
    {"seed": 5, "lr": 0.08, "l1": 0.02, "prune_eps": 0.15, "projected_last_tau": True},
    {"seed": 6, "lr": 0.1, "fixed_tau": True},
    {"seed": 7, "lr": 0.1, "l1": 0.02, "prune_eps": 0.15, "fixed_input_tau": True},
]


def test_a_population_resumed_together_equals_one_trained_in_one_go(mnist: RawDataset) -> None:
    """Seven members (fixed, input-fixed and trainable taus), pruned to different depths
    (one with a pruned block between kept ones while the stack stays deep), stopped after a
    batch and at an epoch's end: resumed together, bitwise; a member resumed alone, or members
    rebuilt from their networks, to the population's tolerance."""
    small = {**SMALL, "epochs": 6, "width": 32, "depth": 5, "T": 1.0}
    configs = [TrainConfig(**{**small, **member}) for member in GROUP]
    whole = train_population(configs, mnist, device="cpu")
    assert any(r.history.pruned for r in whole if isinstance(r, TrainResult))
    for saves in (Saves(stop_after=3), Saves(every=1e9, stop_at_call=40)):
        out = train_population(configs, mnist, device="cpu", checkpoints=saves)
        assert all(isinstance(o, RunPausedError) for o in out)
        states = [saves.saved[-1][i] for i in range(len(configs))]
        assert len({s.group for s in states}) == 1 and states[0].slots is not None
        again = train_population(configs, mnist, device="cpu", states=states)
        for got, want in zip(again, whole, strict=True):
            _same(got, want)
        _close(train(configs[0], mnist, device="cpu", resume=states[0]), whole[0])
        apart = [dataclasses.replace(s, group=None) for s in states]  # as from other groups
        rebuilt = train_population(configs, mnist, device="cpu", states=apart)
        for got, want in zip(rebuilt, whole, strict=True):
            _close(got, want)


def test_members_at_different_points_do_not_train_together(mnist: RawDataset) -> None:
    configs = [TrainConfig(**{**SMALL, **PRUNING, "seed": s}) for s in (1, 2)]
    saves = Saves(stop_after=1)
    with pytest.raises(RunPausedError):
        train(configs[0], mnist, device="cpu", checkpoints=saves)
    with pytest.raises(ValueError, match="all or none"):
        train_population(configs, mnist, device="cpu", states=[saves.saved[-1][0], None])


# -- the study's files of states ---------------------------------------------------------


def _state(mnist: RawDataset, config: TrainConfig) -> RunState:
    saves = Saves(stop_after=1)
    with pytest.raises(RunPausedError):
        train(config, mnist, device="cpu", checkpoints=saves)
    return saves.saved[-1][0]


@pytest.fixture(scope="module")
def saved(mnist: RawDataset) -> tuple[TrainConfig, RunState]:
    config = TrainConfig(**{**SMALL, **PRUNING, "prune_eps": 0.12, "seed": 7})
    return config, _state(mnist, config)


def _identity(config: TrainConfig, mnist: RawDataset, **changes: Any) -> TrialIdentity:
    identity = TrialIdentity(
        study="s",
        run_key="0123456789abcdef0123456789abcdef",
        first_number=7,
        config_hash=config_hash(config, dataset_hash(mnist), False),
    )
    return dataclasses.replace(identity, **changes)


def _load(
    states: TrialStates, identity: TrialIdentity, config: TrainConfig, mnist: RawDataset
) -> RunState | None:
    shape = (mnist.in_features, mnist.num_classes)
    return states.load(identity, config, shape, label="trial 7", saved_at=(1, 0))


def test_a_saved_state_is_replaced_atomically_and_read_back(
    tmp_path: Path, mnist: RawDataset, saved: tuple[TrainConfig, RunState]
) -> None:
    config, state = saved
    lines: list[str] = []
    states = TrialStates(tmp_path / "checkpoints", lines.append)
    identity = _identity(config, mnist)
    assert states.save(identity, state) and states.save(identity, state)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [f"{identity.run_key}.pt"]
    back = _load(states, identity, config, mnist)
    assert back is not None and back.point == state.point and lines == []
    _same(
        train(config, mnist, device="cpu", resume=back),
        train(config, mnist, device="cpu", resume=state),
    )
    states.delete(identity.run_key)
    assert not any((tmp_path / "checkpoints").iterdir())
    assert _load(states, identity, config, mnist) is None  # expected, missing: said
    assert len(lines) == 1 and "is not in" in lines[0] and "starts again from epoch 0" in lines[0]


#: The per-epoch lists of a saved state, as states written before the history was one type
#: name them.
STATE_RECORD = {
    "val": [0.5, 0.6],
    "test": [],
    "train_acc": [0.4, 0.5],
    "losses": [2.0, 1.5],
    "clean": [1.9, 1.4],
    "penalties": [{"l1": 0.1, "horizon": 0.0}, {"l1": 0.1, "horizon": 0.0}],
    "history": [[0.5, 0.5], [0.6, 0.0]],
    "pruned": [{"epoch": 2, "position": 1, "block": 1}],
    "seconds": [1.0, 1.1],
    "train_seconds": [0.9, 1.0],
    "resumed": [{"epoch": 1, "batch": 0}],
}


def test_a_state_s_record_keeps_its_names_and_reads_back(
    saved: tuple[TrainConfig, RunState],
) -> None:
    config, state = saved
    data = state.to_dict()
    assert list(data["record"]) == list(STATE_RECORD)
    older = {**data, "config": config.replace(epochs=3).to_dict(), "epoch": 2}
    back = RunState.from_dict({**older, "record": STATE_RECORD})
    history = back.record
    assert history.val_accuracy == [0.5, 0.6] and history.taus == [[0.5, 0.5], [0.6, 0.0]]
    assert history.pruned == [PruneEvent(epoch=2, position=1, block=1)]
    assert history.resumed_from == [{"epoch": 1, "batch": 0}]
    assert back.to_dict()["record"] == STATE_RECORD


def _damage_truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _damage_garbage(path: Path) -> None:
    path.write_bytes(b"\x00not a state at all" * 100)


def _damage_empty(path: Path) -> None:
    path.write_bytes(b"")


def _damage_foreign(path: Path) -> None:
    torch.save({"format": 1, "config": {}, "state_dict": {}}, path)  # a model file, say


def _damage_weights(path: Path) -> None:
    data = torch.load(path, weights_only=True)
    weights = data["state"]["network"]["state_dict"]
    name = next(iter(weights))
    weights[name] = torch.zeros(3, 3)  # another shape
    torch.save(data, path)


def _damage_records(path: Path) -> None:
    data = torch.load(path, weights_only=True)
    data["state"]["record"]["losses"].append(math.nan)  # an epoch too many
    torch.save(data, path)


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (_damage_truncated, "is damaged"),
        (_damage_garbage, "is damaged"),
        (_damage_empty, "is damaged"),
        (_damage_foreign, "is not a tauopt trial state"),
        (_damage_weights, "is incomplete or damaged"),
        (_damage_records, "is incomplete or damaged"),
    ],
)
def test_a_damaged_state_is_never_used_and_said_once(
    tmp_path: Path,
    mnist: RawDataset,
    saved: tuple[TrainConfig, RunState],
    damage: Any,
    why: str,
) -> None:
    config, state = saved
    lines: list[str] = []
    states = TrialStates(tmp_path, lines.append)
    identity = _identity(config, mnist)
    states.save(identity, state)
    damage(states.path(identity.run_key))
    assert _load(states, identity, config, mnist) is None
    assert len(lines) == 1 and why in lines[0] and "trial 7 starts again from epoch 0" in lines[0]


def test_a_state_of_another_trial_config_dataset_or_format_is_never_used(
    tmp_path: Path, mnist: RawDataset, fashion: RawDataset, saved: tuple[TrainConfig, RunState]
) -> None:
    config, state = saved
    lines: list[str] = []
    states = TrialStates(tmp_path, lines.append)
    identity = _identity(config, mnist)
    states.save(identity, state)
    other = config.replace(lr=0.2)
    cases = [
        (_identity(config, mnist, study="t"), config, "belongs to another trial"),
        (_identity(config, mnist, first_number=8), config, "belongs to another trial"),
        (_identity(other, mnist), other, "another config or dataset"),
        (_identity(config, fashion), config, "another config or dataset"),
    ]
    for theirs, their_config, why in cases:
        lines.clear()
        assert _load(states, theirs, their_config, mnist) is None
        assert len(lines) == 1 and why in lines[0], lines
    data = torch.load(states.path(identity.run_key), weights_only=True)
    torch.save({**data, "format": 99}, states.path(identity.run_key))
    lines.clear()
    assert _load(states, identity, config, mnist) is None
    assert len(lines) == 1 and "has format 99" in lines[0]


def test_a_folder_that_cannot_be_written_is_said_once(
    tmp_path: Path, mnist: RawDataset, saved: tuple[TrainConfig, RunState]
) -> None:
    config, state = saved
    (tmp_path / "checkpoints").write_text("a file where the folder should be")
    lines: list[str] = []
    states = TrialStates(tmp_path / "checkpoints", lines.append)
    identity = _identity(config, mnist)
    assert not states.save(identity, state) and not states.save(identity, state)
    assert len(lines) == 1 and "cannot save the states of running trials" in lines[0]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoints"]  # nothing left behind


# -- stop signals ------------------------------------------------------------------------


def test_a_stop_signal_in_training_is_a_request_and_past_the_grace_a_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(liveness, "HARD_STOP_MARGIN", 0.2)
    with stop_on_signals(0.5) as stops:
        assert stops.stop_in() is None
        with pytest.raises(WorkerStopped, match="SIGTERM"), stops.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler has run: a request, not a stop
            left = stops.stop_in()
            assert stops.name == "SIGTERM" and left is not None and 0 < left <= 0.5
            time.sleep(5)  # past grace and margin: the alarm stops whatever hangs here
        assert stops.stop_in() == 0.0
    with stop_on_signals(10.0), pytest.raises(WorkerStopped, match="SIGINT"):
        os.kill(os.getpid(), signal.SIGINT)  # outside training: at once
        time.sleep(5)


def test_a_dead_worker_s_trial_counts_against_max_retry_only_without_progress() -> None:
    def at(epoch: int, batch: int = 0) -> dict[str, int]:
        return {"epoch": epoch, "batch": batch}

    assert not progressed({})  # never saved: the trial may be what kills its workers
    assert progressed({"saved_state": at(3)})  # saved, started from scratch
    assert progressed({"saved_state": at(3, 5), "started_from": at(3)})
    assert not progressed({"saved_state": at(3), "started_from": at(3)})  # nothing new
    assert not progressed({"saved_state": at(3), "started_from": at(3, 5)})


@pytest.mark.parametrize("value", [-1, "60", True, math.inf])
def test_checkpoint_seconds_must_be_a_number_of_seconds(value: object) -> None:
    with pytest.raises(
        ConfigError, match=r"trial\.checkpoint_seconds: must be a number of seconds"
    ):
        parse_config({"trial": {"checkpoint_seconds": value}})
    assert parse_config({"trial": {"checkpoint_seconds": 0.5}}).trial.checkpoint_seconds == 0.5
    assert parse_config({}).trial.checkpoint_seconds == 60


def test_a_stop_grace_that_is_no_number_of_seconds_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for bad in ("-1", "soon", "inf"):
        argv = ["worker", "--storage", f"sqlite:///{tmp_path / 'x.db'}", "--stop-grace", bad]
        with contextlib.suppress(SystemExit):
            assert main(argv) == 2
        err = capsys.readouterr().err
        assert "--stop-grace" in err and "Traceback" not in err, err
    with pytest.raises(ConfigError, match="stop_grace must lie in"):
        WorkerOptions(artifact_dir=tmp_path, stop_grace=-1.0)
