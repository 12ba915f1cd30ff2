"""Create a study, and run a worker that takes trials until the study's budget is spent."""

from __future__ import annotations

import os
import secrets
import socket
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import optuna
from optuna.artifacts import upload_artifact
from optuna.trial import TrialState

from tauopt.engine import (
    EpochStats,
    RawDataset,
    TrainResult,
    load_dataset,
    resolve_device,
    train,
)
from tauopt.errors import TauoptError
from tauopt.storage import StorageError, StorageSettings, artifact_store, open_storage, study_lock
from tauopt.study._checkpoint import save_checkpoint
from tauopt.study._config import StudyConfig, parse_config
from tauopt.study._objective import (
    DIRECTIONS,
    METRIC_NAMES,
    objective_values,
    suggest_config,
    trial_attributes,
)

CONFIG_ATTR = "tauopt_config"
FAIL_REASON_ATTR = "fail_reason"
ARTIFACT_ATTR = "model_artifact_id"
WORKER_ATTR = "worker"
_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def _quiet_optuna() -> None:
    # Optuna logs every trial at INFO; the worker prints its own one-line summary instead.
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _differences(stored: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``table.key: stored -> new`` for every key whose value differs, in the TOML's terms."""
    out = []
    for table in sorted(set(stored) | set(new)):
        old_t, new_t = stored.get(table, {}), new.get(table, {})
        for key in sorted(set(old_t) | set(new_t)):
            if old_t.get(key) != new_t.get(key):
                out.append(f"{table}.{key}: {old_t.get(key)!r} -> {new_t.get(key)!r}")
    return out


def trials_used(trials: list[optuna.trial.FrozenTrial]) -> int:
    """How much of the budget ``trials`` have used (see :func:`_counted`)."""
    return sum(_counted(t) for t in trials)


def create_study(settings: StorageSettings, study_name: str, config: StudyConfig) -> optuna.Study:
    """Create the schema and the study before workers start.

    Idempotent for the same config. On an existing study the budget (``study.n_trials``) may be
    changed to any total not below the trials already used; any other difference is refused,
    with the keys that differ named.
    """
    _quiet_optuna()
    storage = open_storage(settings, create_schema=True)
    try:
        study = optuna.create_study(
            storage=storage, study_name=study_name, directions=DIRECTIONS[config.objective]
        )
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=storage)
        with study_lock(storage, study_name):
            _update_existing(study, study_name, config)
        return study
    study.set_user_attr(CONFIG_ATTR, config.to_dict())
    with warnings.catch_warnings():  # experimental, but it is what labels the dashboard's axes
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(METRIC_NAMES[config.objective])
    return study


def _update_existing(study: optuna.Study, study_name: str, config: StudyConfig) -> None:
    stored = study.user_attrs.get(CONFIG_ATTR)
    new = config.to_dict()
    if stored is None:
        raise StorageError(
            f"study {study_name!r} exists but was not created by tauopt; pick another --study name"
        )
    if stored == new:
        return
    diff = _differences(stored, new)
    if any(not d.startswith("study.n_trials:") for d in diff):
        raise StorageError(
            f"study {study_name!r} already exists with another configuration "
            f"({'; '.join(diff)}). Only the budget, study.n_trials, can change on an existing "
            "study: put the other keys back, or start a new study with another --study name "
            "(TAUOPT_STUDY in .env under docker compose)"
        )
    used = trials_used(study.get_trials(deepcopy=False))
    if config.n_trials < used:
        raise StorageError(
            f"study {study_name!r} has already used {used} trials of its budget; "
            f"n_trials must be at least {used}, got {config.n_trials}"
        )
    study.set_user_attr(CONFIG_ATTR, new)


@dataclass(frozen=True, kw_only=True)
class WorkerOptions:
    """How one worker process runs: where data and artifacts are, which device, how chatty."""

    data_dir: Path | None = None
    device: str | None = None
    artifact_dir: Path
    sampler_seed: int | None = None
    poll_seconds: float = 2.0
    quiet: bool = False


@dataclass(frozen=True)
class WorkerSummary:
    trials_run: int
    complete: int
    failed: int
    pruned: int


class _Heartbeat:
    """Record the trial's heartbeat every interval while it trains (ask/tell has none built in)."""

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int, interval: float) -> None:
        self._storage, self._trial_id, self._interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tauopt-heartbeat")

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._storage.record_heartbeat(self._trial_id)

    def __enter__(self) -> _Heartbeat:
        self._storage.record_heartbeat(self._trial_id)
        self._thread.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()


def _load_study(
    storage: optuna.storages.RDBStorage, study_name: str, sampler_seed: int
) -> optuna.Study:
    sampler = optuna.samplers.TPESampler(seed=sampler_seed, constant_liar=True)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
    except KeyError:
        raise StorageError(
            f"no study named {study_name!r} in this storage; create it first with "
            f"`tauopt create --study {study_name}`"
        ) from None
    if CONFIG_ATTR not in study.user_attrs:
        raise StorageError(f"study {study_name!r} was not created by tauopt (no stored config)")
    if len(study.directions) == 1:
        study.pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    return study


def _counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Trials that use up budget: all but those failed because their worker died."""
    return trial.state in _COUNTED or (
        trial.state == TrialState.FAIL and FAIL_REASON_ATTR in trial.user_attrs
    )


class Worker:
    """Takes trials from one study, trains them, stores metrics and the trained network."""

    def __init__(self, settings: StorageSettings, study_name: str, options: WorkerOptions) -> None:
        _quiet_optuna()
        self.options = options
        self.sampler_seed = (
            options.sampler_seed if options.sampler_seed is not None else secrets.randbits(31)
        )
        self.storage = open_storage(settings, create_schema=False)
        self.study = _load_study(self.storage, study_name, self.sampler_seed)
        self.study_name = study_name
        self.config = parse_config(self.study.user_attrs[CONFIG_ATTR])
        self.n_trials = self.config.n_trials
        self.heartbeat_interval = settings.heartbeat_interval
        self.device = str(resolve_device(options.device))
        self.store = artifact_store(options.artifact_dir)
        self._dataset: RawDataset | None = None

    def _log(self, message: str) -> None:
        if not self.options.quiet:
            print(f"[worker {self.sampler_seed:x}] {message}", file=sys.stderr, flush=True)

    def dataset(self) -> RawDataset:
        """Loaded once per process and shared by every trial it runs."""
        if self._dataset is None:
            self._dataset = load_dataset(self.config.trial.dataset, self.options.data_dir)
        return self._dataset

    def _claim(self) -> tuple[optuna.Trial | None, int, bool]:
        """Under the study lock: fail stale trials, then take a waiting or a new trial if the
        budget allows. Returns the trial (or None), trials counted, and whether any still run."""
        with study_lock(self.storage, self.study_name), warnings.catch_warnings():
            # fail_stale_trials is experimental, and ask() warns that heartbeats are meant for
            # optimize(): this loop records them itself (see _Heartbeat).
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
            optuna.storages.fail_stale_trials(self.study)
            self._read_budget()
            trials = self.study.get_trials(deepcopy=False)
            used = trials_used(trials)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            running = any(t.state == TrialState.RUNNING for t in trials)
            if waiting or used < self.n_trials:
                return self.study.ask(), used + (0 if waiting else 1), True
            return None, used, running

    def _read_budget(self) -> None:
        # `tauopt create --n-trials` may raise the budget while workers run: read it each claim.
        attrs = self.storage.get_study_user_attrs(self.study._study_id)
        self.n_trials = int(attrs[CONFIG_ATTR]["study"]["n_trials"])

    def run(self) -> WorkerSummary:
        """Run trials until the study's budget is spent and no other worker's trial can fail."""
        self.dataset()
        counts = {"complete": 0, "failed": 0, "pruned": 0}
        run = 0
        while True:
            trial, used, running = self._claim()
            if trial is None:
                if not running:
                    break
                # Another worker's trial is still running; if its worker died, its trial turns
                # stale and comes back as a waiting retry that this worker must pick up.
                time.sleep(self.options.poll_seconds)
                continue
            run += 1
            state = self._run_trial(trial, used)
            counts[state] += 1
        self._log(f"done: {run} trials run here; the study's budget of {self.n_trials} is spent")
        return WorkerSummary(run, counts["complete"], counts["failed"], counts["pruned"])

    def _run_trial(self, trial: optuna.Trial, used: int) -> str:
        # A retried trial keeps the seed of the trial it retries, so the rerun is the same run.
        system_attrs = self.storage.get_trial_system_attrs(trial._trial_id)
        seed = int(system_attrs.get("failed_trial", trial.number))
        start = time.perf_counter()
        with _Heartbeat(self.storage, trial._trial_id, self.heartbeat_interval):
            try:
                config = suggest_config(trial, self.config, seed=seed)
                # Recorded once the parameters are fixed: a retry of this trial reruns them.
                trial.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:{os.getpid()}")
                reporter = self._reporter(trial) if len(self.study.directions) == 1 else None
                result = train(
                    config,
                    self.dataset(),
                    device=self.device,
                    on_epoch=reporter,
                    progress=not self.options.quiet,
                    label=f"[worker {self.sampler_seed:x}] trial {trial.number}",
                )
            except optuna.TrialPruned:
                self.study.tell(trial, state=TrialState.PRUNED)
                self._log(
                    f"trial {trial.number} pruned by the median rule [{used}/{self.n_trials}]"
                )
                return "pruned"
            except TauoptError as e:  # diverged, or an invalid combination of parameters
                return self._fail(trial, str(e), used)
            except Exception as e:  # never let one trial take the worker down
                traceback.print_exc(file=sys.stderr)
                return self._fail(trial, f"{type(e).__name__}: {e}", used)
            for key, value in trial_attributes(result).items():
                trial.set_user_attr(key, value)
            self._save_model(trial, result)
            self.study.tell(trial, objective_values(result, self.config.objective))
        self._log(
            f"trial {trial.number} complete [{used}/{self.n_trials}]: {config.arch} "
            f"val {result.val_accuracy[-1]:.4f} test {result.test_accuracy:.4f}, "
            f"{result.active_blocks}/{config.depth} blocks, {result.active_params} params, "
            f"{time.perf_counter() - start:.1f}s"
        )
        return "complete"

    def _reporter(self, trial: optuna.Trial) -> Callable[[EpochStats], None]:
        def report(stats: EpochStats) -> None:
            trial.report(stats.val_accuracy, stats.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        return report

    def _fail(self, trial: optuna.Trial, reason: str, used: int) -> str:
        trial.set_user_attr(FAIL_REASON_ATTR, reason)
        self.study.tell(trial, state=TrialState.FAIL)
        self._log(f"trial {trial.number} failed [{used}/{self.n_trials}]: {reason}")
        return "failed"

    def _save_model(self, trial: optuna.Trial, result: TrainResult) -> None:
        dataset = self.dataset()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"trial-{trial.number}.pt"
            save_checkpoint(result, dataset.in_features, dataset.num_classes, path)
            artifact_id = upload_artifact(
                artifact_store=self.store, file_path=str(path), study_or_trial=trial
            )
        trial.set_user_attr(ARTIFACT_ATTR, artifact_id)
