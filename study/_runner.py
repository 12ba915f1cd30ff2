"""The runner: trains a group of planned trials and turns each into an outcome, booked in the
ledger: completed (model saved, metrics stored, told), pruned (stopped by the median rule),
failed (its own fault: diverged, invalid parameters), requeued (not its fault: its model could
not be saved), or dropped (another worker finished it while this one stalled)."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import upload_artifact
from optuna.trial import TrialState

from tauopt.engine import (
    EpochStats,
    RawDataset,
    RunPausedError,
    RunState,
    RunStoppedError,
    TrainResult,
    train_population,
)
from tauopt.errors import StorageError, TauoptError
from tauopt.storage import constraint_attrs, is_storage_error, trial_id
from tauopt.study._checkpoint import save_checkpoint
from tauopt.study._config import StudyConfig, stop_rule
from tauopt.study._ledger import Claim, FinishedElsewhereError, Ledger
from tauopt.study._liveness import StopSignals
from tauopt.study._objective import objective_values
from tauopt.study._planner import Group, Planned
from tauopt.study._record import SAVED_STATE_ATTR, TrialRecord
from tauopt.study._resume import (
    FOLDER,
    TrialIdentity,
    TrialStates,
    config_hash,
    dataset_hash,
    where,
)
from tauopt.study._stopping import DominanceRule

#: Saves in a row that may fail (disk full, folder gone) before the worker stops.
MAX_SAVE_FAILURES = 3
#: The constraint a trial below the study's ``min_val_accuracy`` violates.
MIN_ACCURACY_CONSTRAINT = "min_val_accuracy"


@dataclasses.dataclass(frozen=True)
class _Saves:
    """A group's checkpoints: every ``checkpoint_seconds``, and when the worker is stopped."""

    runner: Runner
    group: Group

    @property
    def every(self) -> float:
        return self.runner.every if self.runner.states is not None else 0.0

    def stop_in(self) -> float | None:
        return self.runner.settings.stops.stop_in()

    def save(self, states: Mapping[int, RunState]) -> None:
        for index, state in states.items():
            self.runner.save(self.group.members[index], state)


def machine(device: str) -> str:
    """The CPU's model name and cores, or the GPU's name: what a measurement names."""
    if device.startswith("cuda"):
        import torch

        return str(torch.cuda.get_device_name(torch.device(device)))
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores"


class Outcome(enum.Enum):
    COMPLETE = "complete"
    PRUNED = "pruned"
    FAILED = "failed"
    REQUEUED = "requeued"
    DROPPED = "dropped"


@dataclass(frozen=True)
class Booked:
    """What became of a trial; ``record`` for a completed one (the publisher notes it)."""

    trial: optuna.Trial
    outcome: Outcome
    record: TrialRecord | None = None
    feasible: bool = True


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """How the runner trains: on which device, where models go, how chatty."""

    device: str
    artifact_dir: Path
    store: Any  # an Optuna artifact store
    progress: bool
    label: str
    #: The worker's stop signals: training is asked to stop and save rather than broken into.
    stops: StopSignals = dataclasses.field(default_factory=StopSignals)


class Runner:
    """Trains groups of one study's trials and books each trial's outcome."""

    def __init__(
        self,
        ledger: Ledger,
        config: StudyConfig,
        settings: RunSettings,
        dataset: Callable[[str], RawDataset],
        log: Callable[[str], None],
    ) -> None:
        self.ledger, self.config, self.settings = ledger, config, settings
        self.dataset, self.log = dataset, log
        self._save_failures = 0
        self.stop_rule = stop_rule(config.stop_trials, config.objective)
        self._dominance = DominanceRule(ledger.study, ledger, config.trial.epochs)
        self.every = float(config.trial.checkpoint_seconds)
        #: Running trials' states, in the artifact folder (none where checkpoints are off).
        self.states = (
            TrialStates(settings.artifact_dir / FOLDER, ledger.say) if self.every > 0 else None
        )
        self._dataset_hashes: dict[str, str] = {}

    def identity(self, planned: Planned) -> TrialIdentity | None:
        """Whose state a trial's file holds (None: the trial saves none)."""
        if self.states is None or planned.run_key is None:
            return None
        name = planned.config.dataset
        if name not in self._dataset_hashes:
            self._dataset_hashes[name] = dataset_hash(self.dataset(name))
        return TrialIdentity(
            study=self.ledger.study.study_name,
            run_key=planned.run_key,
            first_number=planned.first_number,
            config_hash=config_hash(planned.config, self._dataset_hashes[name], planned.grid),
        )

    def with_states(self, planned: list[Planned]) -> list[Planned]:
        """Each trial with the state it goes on from, where it has a usable one."""
        out = []
        for p in planned:
            identity = self.identity(p)
            if self.states is None or identity is None:
                out.append(p)
                continue
            dataset = self.dataset(p.config.dataset)
            state = self.states.load(
                identity,
                p.config,
                (dataset.in_features, dataset.num_classes),
                label=f"trial {p.trial.number}",
                saved_at=p.saved_at,
            )
            if state is not None:
                self.log(
                    f"trial {p.trial.number} goes on from its state after {where(state.point)} "
                    f"(of {p.config.epochs})"
                )
            out.append(dataclasses.replace(p, resume=state))
        return out

    def run(self, group: Group) -> list[Booked]:
        """Train ``group`` as one population (or each alone, where it is small) and book
        every member."""
        start = time.perf_counter()
        reporters = [None if group.grid else self._reporter(p.trial) for p in group.members]

        def on_epoch(index: int, stats: EpochStats) -> None:
            report = reporters[index]
            if report is not None:
                report(stats)

        resumed = [p.resume for p in group.members]
        results = train_population(
            [p.config for p in group.members],
            self.dataset(group.members[0].config.dataset),
            device=self.settings.device,
            on_epoch=on_epoch,
            progress=self.settings.progress,
            label=f"{self.settings.label} {group.name}",
            test_every_epoch=group.grid,
            states=resumed if any(s is not None for s in resumed) else None,
            checkpoints=_Saves(self, group),
        )
        seconds = time.perf_counter() - start
        return [self.book(p, r, seconds) for p, r in zip(group.members, results, strict=True)]

    def book(self, planned: Planned, result: TrainResult | Exception, seconds: float) -> Booked:
        """Store a trial's result or book what ended it; a trial that ended (complete,
        stopped, failed through its own fault) leaves no saved state behind."""
        if isinstance(result, RunPausedError):
            return self._paused(planned, result)
        if isinstance(result, TrainResult):
            booked = self._dropping(planned.trial, lambda: self._complete(planned, result, seconds))
        else:
            booked = self.book_unplanned(planned.claim, result)
        ended = booked.outcome in (Outcome.COMPLETE, Outcome.PRUNED, Outcome.FAILED)
        if ended and self.states is not None and planned.run_key is not None:
            self.states.delete(planned.run_key)
        return booked

    def _paused(self, planned: Planned, paused: RunPausedError) -> Booked:
        """A trial whose worker was stopped: handed back, to go on from its saved state."""
        name = self.settings.stops.name or "a signal"
        saved = "" if paused.saved is None else f"; it goes on from epoch {paused.saved[0]}"
        if paused.saved is not None and paused.saved[1]:
            saved += f", batch {paused.saved[1]}"
        self.ledger.hand_back(planned.trial, f"its worker was stopped by {name}{saved}", quick=True)
        return Booked(planned.trial, Outcome.REQUEUED)

    def save(self, planned: Planned, state: RunState) -> None:
        """Save a trial's state and note in its record where it stands (the note is a
        courtesy: one try, a failure only costs a clearer line if the file goes missing)."""
        identity = self.identity(planned)
        if self.states is None or identity is None or not self.states.save(identity, state):
            return
        point = {"epoch": state.epoch, "batch": state.batch}
        with contextlib.suppress(Exception):
            self.ledger.access.set_trial_attrs(
                trial_id(planned.trial), user={SAVED_STATE_ATTR: point}, system={}
            )

    def book_unplanned(self, claim: Claim, error: Exception) -> Booked:
        """Book a trial that ended with ``error`` (in training, or while its parameters were
        drawn)."""
        return self._dropping(claim.trial, lambda: self._ended(claim, error))

    def _dropping(self, trial: optuna.Trial, book: Callable[[], Booked]) -> Booked:
        """``book()``; a trial that another worker finished meanwhile (this one stalled) is
        dropped."""
        try:
            return book()
        except FinishedElsewhereError:
            self.ledger.say(
                f"trial {trial.number} was finished by another worker while this one stalled "
                "(its heartbeat went stale); this worker's result is dropped"
            )
            return Booked(trial, Outcome.DROPPED)

    def _ended(self, claim: Claim, e: Exception) -> Booked:
        trial, place = claim.trial, claim.place
        partial = e.result if isinstance(e, RunStoppedError) else None  # what it trained
        e = e.cause if isinstance(e, RunStoppedError) else e  # booked by what stopped it
        if isinstance(e, optuna.TrialPruned):
            return self._stopped(claim, e, partial)
        if isinstance(e, (StorageError, FinishedElsewhereError)) or (
            is_storage_error(e) and not isinstance(e, TauoptError)
        ):
            raise e  # the storage's fault, not the trial's: the worker stops, the trial is retried
        if not isinstance(e, TauoptError):  # a bug: its traceback, but never the worker's end
            traceback.print_exception(e, file=sys.stderr)
        reason = str(e) if isinstance(e, TauoptError) else f"{type(e).__name__}: {e}"
        self.ledger.fail(trial, reason)
        self.log(f"trial {trial.number} failed [{place}/{self.ledger.n_trials}]: {reason}")
        return Booked(trial, Outcome.FAILED)

    def _complete(self, planned: Planned, result: TrainResult, seconds: float) -> Booked:
        """Save the model, write the metrics and tell the result."""
        trial, config = planned.trial, result.config
        dataset = self.dataset(config.dataset)
        artifact_id = self._save_model(trial, result, dataset)
        if artifact_id is None:
            return Booked(trial, Outcome.REQUEUED)
        record = TrialRecord.from_result(
            result,
            dataset.in_features,
            dataset.num_classes,
            artifact_id=artifact_id,
            machine=machine(result.device),
        )
        values = objective_values(result, self.config.objective)
        # Feasible when <= 0: a trial below the floor is stored, shown, and never "best".
        margin = self.config.min_val_accuracy - (record.val_accuracy or 0.0)
        system = {} if planned.grid else constraint_attrs(MIN_ACCURACY_CONSTRAINT, margin)
        self.ledger.complete(trial, values, record.to_attrs(), system)
        accuracy = (
            f"val {record.val_accuracy:.4f}" if record.val_accuracy is not None else "no validation"
        )
        self.log(
            f"trial {trial.number} complete [{planned.claim.place}/{self.ledger.n_trials}]"
            f"{' (an anchor)' if planned.anchor else ''}: "
            f"{config.arch} {accuracy} test {result.test_accuracy:.4f}, "
            f"{result.active_blocks}/{config.depth} blocks, {result.active_params} params, "
            f"{seconds:.1f}s"
        )
        return Booked(trial, Outcome.COMPLETE, record, feasible=planned.grid or margin <= 0)

    def _stopped(self, claim: Claim, e: optuna.TrialPruned, result: TrainResult | None) -> Booked:
        """A trial the stop rule ended: PRUNED, with the record of what it trained (``result``,
        where it trained at all)."""
        trial, place = claim.trial, claim.place
        if result is not None:
            dataset = self.dataset(result.config.dataset)
            record = TrialRecord.from_result(
                result, dataset.in_features, dataset.num_classes, artifact_id=None
            )
            self.ledger.guarded(
                "storing the metrics",
                lambda: self.ledger.access.set_trial_attrs(
                    trial_id(trial), user=record.to_attrs(), system={}
                ),
            )
        self.ledger.finish(trial, None, TrialState.PRUNED)
        why = str(e) or "by the median rule"
        self.log(f"trial {trial.number} stopped early, {why} [{place}/{self.ledger.n_trials}]")
        return Booked(trial, Outcome.PRUNED)

    def _reporter(self, trial: optuna.Trial) -> Callable[[EpochStats], None] | None:
        """The study's stop rule after each epoch, or None."""
        if self.stop_rule == "dominated":
            return self._dominance.reporter(trial)
        if self.stop_rule != "median":
            return None

        def report(stats: EpochStats) -> None:
            self.ledger.guarded("reporting", lambda: trial.report(stats.val_accuracy, stats.epoch))
            if self.ledger.guarded("asking the pruner", trial.should_prune):
                raise optuna.TrialPruned()

        return report

    def _save_model(
        self, trial: optuna.Trial, result: TrainResult, dataset: RawDataset
    ) -> str | None:
        """Store the trained network as an artifact. A disk failure fails the trial and queues
        it again (not its fault); several in a row stop the worker."""
        folder = self.settings.artifact_dir
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"trial-{trial.number}.pt"
                save_checkpoint(result, dataset.in_features, dataset.num_classes, path)
                artifact_id = self.ledger.guarded(
                    "storing the model",
                    lambda: upload_artifact(
                        artifact_store=self.settings.store,
                        file_path=str(path),
                        study_or_trial=trial,
                    ),
                )
        except OSError as e:
            self._save_failures += 1
            self.ledger.hand_back(trial, f"cannot save its model to {folder}: {e.strerror or e}")
            if self._save_failures >= MAX_SAVE_FAILURES:
                raise StorageError(
                    f"{MAX_SAVE_FAILURES} models in a row could not be saved to {folder} "
                    f"({e.strerror or e}); fix the folder or choose another --artifact-dir"
                ) from e
            return None
        self._save_failures = 0
        return str(artifact_id)
