"""A worker: takes trials from one study until its budget is spent, trains them, stores them.

The jobs are split: the :class:`~tauopt.study._ledger.Ledger` claims trials against the
budget and books them, the :class:`~tauopt.study._planner.Planner` fixes their configs and
groups them, the :class:`~tauopt.study._runner.Runner` trains a group and turns each trial
into an outcome, the :class:`~tauopt.study._publisher.Publisher` draws the dashboard. The
worker sets up the process and runs the loop.

The database is a remote service: every storage call goes through the worker's
:class:`~tauopt.storage.RetryPolicy`, and a storage failure is never booked against a trial.
"""

from __future__ import annotations

import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import optuna

from tauopt.engine import PRECISIONS, RawDataset, load_dataset, resolve_device, set_threads
from tauopt.errors import ConfigError, DataError, StorageError
from tauopt.storage import (
    RetryPolicy,
    StorageSettings,
    WindowedTPESampler,
    access,
    artifact_store,
    open_storage,
)
from tauopt.study._config import GRID_OBJECTIVE, StudyConfig, parse_config, stop_rule
from tauopt.study._create import quiet_optuna
from tauopt.study._ledger import Claim, Ledger
from tauopt.study._liveness import Heartbeat, StopSignals, WorkerStopped, stop_on_signals
from tauopt.study._planner import Planner
from tauopt.study._publisher import Publisher
from tauopt.study._record import CONFIG_ATTR
from tauopt.study._reproduce import REPRODUCE_ATTR
from tauopt.study._runner import Booked, Outcome, Runner, RunSettings

T = TypeVar("T")

#: The default of ``--stop-grace``: half of the shortest common preemption notice (30 s: spot
#: VMs on Google Cloud and Azure, Kubernetes' default termination grace), so that the other
#: half is left for saving the states, handing the trials back and exiting.
DEFAULT_STOP_GRACE = 15.0
#: A day: no preemption notice is longer.
MAX_STOP_GRACE = 86_400.0


@dataclass(frozen=True, kw_only=True)
class WorkerOptions:
    """How one worker process runs: where data and artifacts are, which device, how chatty,
    and how long it rides out storage failures."""

    data_dir: Path | None = None
    device: str | None = None
    artifact_dir: Path
    sampler_seed: int | None = None
    poll_seconds: float = 2.0
    quiet: bool = False
    threads: int | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: Trials claimed at once and trained together where their shapes agree (see
    #: ``tauopt.engine.train_population``); 1 trains one trial at a time.
    batch_trials: int = 1
    #: The training step's products for every trial here; unset, the study's [trial] one.
    precision: str | None = None
    #: Seconds a stop signal gives the running trials to reach their epoch's end, where their
    #: states are saved (else they are saved at the end of the current batch).
    stop_grace: float = DEFAULT_STOP_GRACE

    def __post_init__(self) -> None:
        k = self.batch_trials
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"batch_trials must be an integer >= 1, got {k!r}")
        seed = self.sampler_seed
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if seed is not None and not 0 <= seed < 2**32:
            raise ConfigError(f"sampler_seed must lie in [0, 2**32), got {seed}")
        grace = self.stop_grace
        if isinstance(grace, bool) or not isinstance(grace, (int, float)):
            raise ConfigError(f"stop_grace must be a number of seconds, got {grace!r}")
        if not 0 <= grace <= MAX_STOP_GRACE:
            raise ConfigError(
                f"stop_grace must lie in [0, {MAX_STOP_GRACE:g}] seconds, got {grace}"
            )


@dataclass(frozen=True)
class WorkerSummary:
    """What one worker did. ``requeued``: failed through no fault of their own and queued
    again; ``dropped``: finished by another worker meanwhile (this one had stalled);
    ``stopped``: the signal that stopped the worker, if one did."""

    trials_run: int
    complete: int
    failed: int
    pruned: int
    requeued: int = 0
    dropped: int = 0
    stopped: str | None = None


def _load_study(
    storage: optuna.storages.BaseStorage, study_name: str, sampler_seed: int
) -> tuple[optuna.Study, StudyConfig]:
    """The study and its stored config, read at once (every read here may fail transiently:
    the caller retries the whole)."""
    sampler = WindowedTPESampler(seed=sampler_seed, constant_liar=True)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler)
    except KeyError:
        raise StorageError(
            f"no study named {study_name!r} in this storage; create it first with "
            f"`tauopt create --study {study_name}`"
        ) from None
    attrs = study.user_attrs
    if CONFIG_ATTR not in attrs:
        raise StorageError(f"study {study_name!r} was not created by tauopt (no stored config)")
    config = parse_config(attrs[CONFIG_ATTR])
    grid = config.objective == GRID_OBJECTIVE
    if not grid and stop_rule(config.stop_trials, config.objective) == "median":
        study.pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    return study, config


class Worker:
    """Takes trials from one study, trains them, stores metrics and the trained network."""

    def __init__(
        self,
        settings: StorageSettings,
        study_name: str,
        options: WorkerOptions,
        *,
        dataset: RawDataset | None = None,
    ) -> None:
        """``dataset``: the study's data, where the caller has it loaded already (checked
        against the study like any other)."""
        quiet_optuna()
        self.options, self.settings, self.study_name = options, settings, study_name
        self.sampler_seed = (
            options.sampler_seed if options.sampler_seed is not None else secrets.randbits(31)
        )
        self.device = str(resolve_device(options.device))
        set_threads(options.threads)
        self.store = artifact_store(options.artifact_dir)  # checked before any trial trains
        self.storage: Any = self._db(
            "opening the storage", lambda: open_storage(settings, create_schema=False)
        )
        self.study, self.config = self._db(
            "loading the study", lambda: _load_study(self.storage, study_name, self.sampler_seed)
        )
        self.access = access(self.storage, max_retry=settings.max_retry, log=self._say)
        self.grace = settings.grace_period or 2 * settings.heartbeat_interval
        self._datasets: dict[str, RawDataset] = {}
        self._loaded = dataset

    def _log(self, message: str) -> None:
        if not self.options.quiet:
            self._say(message)

    def _say(self, message: str) -> None:
        """Printed even with --quiet: what goes wrong is never silent."""
        print(f"[worker {self.sampler_seed:x}] {message}", file=sys.stderr, flush=True)

    def _db(self, what: str, fn: Callable[[], T]) -> T:
        return self.options.retry.call(what, fn, self._say)

    def dataset(self, name: str | None = None) -> RawDataset:
        """Loaded once per process and shared by every trial it runs (a grid study of
        ``tauopt reproduce`` uses both datasets)."""
        name = name or self.config.trial.dataset
        if name not in self._datasets:
            loaded = self._loaded
            dataset = (
                loaded
                if loaded is not None and loaded.name == name
                else load_dataset(name, self.options.data_dir)
            )
            expected = self.config.trial.dataset_sha256
            if expected and dataset.sha256 != expected:
                raise DataError(
                    f"{name} here is not the file the study was created with (sha256 "
                    f"{dataset.sha256} here, {expected} in the study): copy the study's file "
                    "to this worker, or create a new study for this file"
                )
            self._datasets[name] = dataset
        return self._datasets[name]

    def run(self) -> WorkerSummary:
        """Run trials until the study's budget is spent and no other worker's trial can fail.

        SIGTERM or SIGINT stops the training at the end of the current batch, or at the end of
        the epoch if that comes within ``stop_grace`` seconds, saves the running trials' states
        (see ``tauopt.study._resume``), then fails the trials this worker holds and queues
        them again, so that another worker goes on with them now rather than after the grace
        period. Outside training (claiming, waiting) it does so at once.
        """
        counts: Counter[Outcome] = Counter()
        stopped = None
        heartbeat = Heartbeat(self.access, self.settings.heartbeat_interval, self._say)
        ledger = Ledger(
            self.study,
            self.storage,
            grace=self.grace,
            retry=self.options.retry,
            heartbeat=heartbeat,
            say=self._say,
            access=self.access,
        )
        publisher = Publisher(self.study, self.access, self._say)
        with stop_on_signals(self.options.stop_grace) as stops, heartbeat:
            try:
                self._loop(ledger, publisher, counts, stops)
                publisher.last()  # this worker's last trials, unless drawn since
            except WorkerStopped as e:
                stopped = e.signal_name
                self._say(f"stopped by {stopped}")
                for claimed in ledger.held():
                    ledger.hand_back(claimed, f"its worker was stopped by {stopped}", quick=True)
        if stopped is None:
            self._log(
                f"done: {counts.total()} trials run here; the study's budget of "
                f"{ledger.n_trials} is spent"
            )
        return WorkerSummary(
            trials_run=counts.total(),
            complete=counts[Outcome.COMPLETE],
            failed=counts[Outcome.FAILED],
            pruned=counts[Outcome.PRUNED],
            requeued=counts[Outcome.REQUEUED],
            dropped=counts[Outcome.DROPPED],
            stopped=stopped,
        )

    def _loop(
        self,
        ledger: Ledger,
        publisher: Publisher,
        counts: Counter[Outcome],
        stops: StopSignals,
    ) -> None:
        self.dataset()
        grid = self._db("reading the study", lambda: self.study.user_attrs.get(REPRODUCE_ATTR))
        planner = Planner(
            ledger,
            self.config,
            grid["spec"]["choices"] if grid else None,
            precision=self.options.precision,
        )
        settings = RunSettings(
            device=self.device,
            artifact_dir=self.options.artifact_dir,
            store=self.store,
            progress=not self.options.quiet,
            label=f"[worker {self.sampler_seed:x}]",
            stops=stops,
        )
        runner = Runner(ledger, self.config, settings, self.dataset, self._log)
        while True:
            claims, running = ledger.claim(self.options.batch_trials)
            if not claims:
                if not running:
                    return
                # Another worker's trial is still running; if its worker died, its trial turns
                # stale and comes back as a waiting retry that this worker must pick up.
                time.sleep(self.options.poll_seconds)
                continue
            with stops.deferred():  # a stop signal asks the training to save and stop
                for booked in self._run_claims(claims, planner, runner):
                    counts[booked.outcome] += 1
                    if booked.record is not None:
                        publisher.trial(booked.trial, booked.record, feasible=booked.feasible)
            if stops.name is not None:
                raise WorkerStopped(stops.name)

    def _run_claims(self, claims: list[Claim], planner: Planner, runner: Runner) -> list[Booked]:
        booked: list[Booked] = []
        planned = []
        for claim in claims:
            try:
                planned.append(planner.prepare(claim))
            except Exception as e:  # its parameters could not be drawn: the trial's end
                booked.append(runner.book_unplanned(claim, e))
        for group in planner.groups(runner.with_states(planned)):
            booked += runner.run(group)
        return booked
