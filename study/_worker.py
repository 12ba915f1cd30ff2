"""A worker: takes trials from one study until its budget is spent, trains them, stores them.

The database is a remote service: every storage call goes through the worker's
:class:`~tauopt.storage.RetryPolicy`, and a storage failure is never booked against a trial.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import optuna
from optuna.artifacts import upload_artifact
from optuna.trial import TrialState

from tauopt.engine import (
    EpochStats,
    RawDataset,
    TrainConfig,
    TrainResult,
    group_key,
    load_dataset,
    resolve_device,
    set_threads,
    train_population,
)
from tauopt.errors import ConfigError, StorageError, TauoptError
from tauopt.storage import (
    RetryPolicy,
    StorageSettings,
    artifact_store,
    is_storage_error,
    open_storage,
    set_trial_attrs,
    study_lock,
    trial_counts,
)
from tauopt.study._budget import (
    ARTIFACT_ATTR,
    CONFIG_ATTR,
    FAIL_REASON_ATTR,
    RETRY_REASON_ATTR,
    WORKER_ATTR,
    budget_used,
)
from tauopt.study._checkpoint import save_checkpoint
from tauopt.study._config import parse_config
from tauopt.study._create import _quiet_optuna
from tauopt.study._figures import publish, write_trial_note
from tauopt.study._liveness import Heartbeat, WorkerStopped, fail_stale_trials, stop_on_signals
from tauopt.study._objective import objective_values, suggest_config, trial_attributes
from tauopt.study._reproduce import GRID_CONFIG_ATTR
from tauopt.study._sampler import WindowedTPESampler
from tauopt.study._views import TrialView, trial_note, view_from

T = TypeVar("T")
#: Optuna's system attribute of the constraint ``trial.set_constraint("min_val_accuracy", ...)``.
CONSTRAINT_KEY = "constraints:min_val_accuracy"
#: Seconds between two redrawings of the study's figures by one worker: small next to a trial,
#: and the figures never lag far behind.
PUBLISH_EVERY = 30.0
#: Saves in a row that may fail (disk full, folder gone) before the worker stops.
_MAX_SAVE_FAILURES = 3


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

    def __post_init__(self) -> None:
        k = self.batch_trials
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"batch_trials must be an integer >= 1, got {k!r}")


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
    storage: optuna.storages.RDBStorage, study_name: str, sampler_seed: int
) -> optuna.Study:
    sampler = WindowedTPESampler(seed=sampler_seed, constant_liar=True)
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


class _FinishedElsewhereError(Exception):
    """The trial was finished by another worker while this one had stalled."""


class Worker:
    """Takes trials from one study, trains them, stores metrics and the trained network."""

    def __init__(self, settings: StorageSettings, study_name: str, options: WorkerOptions) -> None:
        _quiet_optuna()
        self.options = options
        self.settings = settings
        self.sampler_seed = (
            options.sampler_seed if options.sampler_seed is not None else secrets.randbits(31)
        )
        self.device = str(resolve_device(options.device))
        set_threads(options.threads)
        self.store = artifact_store(options.artifact_dir)  # checked before any trial trains
        self.storage = self._db(
            "opening the storage", lambda: open_storage(settings, create_schema=False)
        )
        self.study = self._db(
            "loading the study", lambda: _load_study(self.storage, study_name, self.sampler_seed)
        )
        self.study_name = study_name
        self.config = parse_config(self.study.user_attrs[CONFIG_ATTR])
        self.n_trials = self.config.n_trials
        self.grace = settings.grace_period or 2 * settings.heartbeat_interval
        self._datasets: dict[str, RawDataset] = {}
        self._save_failures = 0
        self._published = -PUBLISH_EVERY  # the first completed trial publishes the figures
        self._publish_every = PUBLISH_EVERY

    # -- output and storage calls ------------------------------------------------------------

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
            self._datasets[name] = load_dataset(name, self.options.data_dir)
        return self._datasets[name]

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> WorkerSummary:
        """Run trials until the study's budget is spent and no other worker's trial can fail.

        SIGTERM or SIGINT fails the running trial at once and queues it again, so that another
        worker reruns it now rather than after the grace period; the summary says so.
        """
        counts: Counter[str] = Counter()
        stopped = None
        with stop_on_signals():
            try:
                self._loop(counts)
                if counts["complete"]:
                    self._show()  # the figures with this worker's last trials
            except WorkerStopped as e:
                stopped = e.signal_name
                self._say(f"stopped by {stopped}")
        if stopped is None:
            self._log(
                f"done: {counts.total()} trials run here; the study's budget of "
                f"{self.n_trials} is spent"
            )
        return WorkerSummary(
            trials_run=counts.total(),
            complete=counts["complete"],
            failed=counts["failed"],
            pruned=counts["pruned"],
            requeued=counts["requeued"],
            dropped=counts["dropped"],
            stopped=stopped,
        )

    def _loop(self, counts: Counter[str]) -> None:
        self.dataset()
        k = self.options.batch_trials
        while True:
            claimed, running = self._db("claiming trials", lambda: self._claim(k))
            if not claimed:
                if not running:
                    return
                # Another worker's trial is still running; if its worker died, its trial turns
                # stale and comes back as a waiting retry that this worker must pick up.
                time.sleep(self.options.poll_seconds)
                continue
            counts.update(self._run_batch(claimed))

    def _claim(self, k: int) -> tuple[list[tuple[optuna.Trial, int]], bool]:
        """Under the study lock: fail dead trials, then take up to ``k`` waiting or new trials,
        as far as the budget allows. Returns each trial with the trials counted once it was
        taken, and whether any trial still runs."""
        with study_lock(self.storage, self.study_name):
            for number, why in fail_stale_trials(self.study, self.grace):
                self._say(f"trial {number} {why} for {self.grace} s: failed and queued again")
            # `tauopt create --n-trials` may raise the budget while workers run.
            attrs = self.storage.get_study_user_attrs(self.study._study_id)
            self.n_trials = int(attrs[CONFIG_ATTR]["study"]["n_trials"])
            # Counted in the database, not by reading every trial of the study.
            counts, own_failures = trial_counts(
                self.storage, self.study._study_id, failed_with_attr=FAIL_REASON_ATTR
            )
            used = budget_used(counts, own_failures)
            waiting = counts.get("WAITING", 0)
            claimed: list[tuple[optuna.Trial, int]] = []
            # ask() takes a waiting trial (a retry, counted already) before it makes a new one.
            while len(claimed) < k and (waiting or used < self.n_trials):
                if waiting:
                    waiting -= 1
                else:
                    used += 1
                claimed.append((self._ask(), used))
            return claimed, bool(claimed) or counts.get("RUNNING", 0) > 0

    def _ask(self) -> optuna.Trial:
        with warnings.catch_warnings():
            # ask() warns that heartbeats are meant for optimize(): this loop records them
            # itself (see Heartbeat).
            warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
            trial = self.study.ask()
        # The first heartbeat inside the lock, so no other worker sees this trial running
        # without one. If it fails, the trial is still ours (asking again would leave it
        # orphaned): the heartbeat thread records it within an interval.
        try:
            self.storage.record_heartbeat(trial._trial_id)
        except Exception as e:
            if not is_storage_error(e):
                raise
        return trial

    # -- the claimed trials, trained in groups of one shape ---------------------------------

    def _prepare(self, trial: optuna.Trial) -> tuple[TrainConfig, bool]:
        """The trial's training config, and whether it is a fixed run of ``tauopt reproduce``."""
        stored = self._db("reading the trial", lambda: self.storage.get_trial(trial._trial_id))
        # A retried trial keeps the seed of the trial it retries, so the rerun is the same run.
        seed = int(stored.system_attrs.get("failed_trial", trial.number))
        grid_point = stored.user_attrs.get(GRID_CONFIG_ATTR)
        if grid_point is not None:  # a run of `tauopt reproduce`: fixed, seed included
            config = TrainConfig(**grid_point)
        else:
            config = self._guarded(
                "reading the trial's parameters",
                lambda: suggest_config(trial, self.config, seed=seed),
                trial,
            )
        # Recorded once the parameters are fixed: a retry of this trial reruns them.
        worker = f"{socket.gethostname()}:{os.getpid()}"
        self._guarded(
            "recording the worker", lambda: trial.set_user_attr(WORKER_ATTR, worker), trial
        )
        return config, grid_point is not None

    def _ended(self, trial: optuna.Trial, e: Exception, used: int) -> str:
        """Book a trial whose preparation or training raised ``e``."""
        if isinstance(e, optuna.TrialPruned):
            self._finish(trial, None, TrialState.PRUNED)
            self._log(f"trial {trial.number} pruned by the median rule [{used}/{self.n_trials}]")
            return "pruned"
        if isinstance(e, (StorageError, _FinishedElsewhereError)):
            raise e  # the storage's fault, not the trial's: the worker stops, the trial is retried
        if isinstance(e, TauoptError):  # diverged, or an invalid combination of parameters
            return self._fail(trial, str(e), used)
        if is_storage_error(e):
            raise e
        # Never let one trial take the worker down.
        traceback.print_exception(e, file=sys.stderr)
        return self._fail(trial, f"{type(e).__name__}: {e}", used)

    def _store(self, trial: optuna.Trial, result: TrainResult, used: int, seconds: float) -> str:
        """Save the model, write the metrics and tell the result."""
        config = result.config
        artifact_id = self._save_model(trial, result)
        if artifact_id is None:
            return "requeued"
        attrs = {**trial_attributes(result), ARTIFACT_ATTR: artifact_id}
        # Feasible when <= 0: a trial below the floor is stored, shown, and never "best".
        constraint = {CONSTRAINT_KEY: self.config.min_val_accuracy - attrs["val_accuracy"]}
        self._guarded(
            "storing the metrics",
            lambda: set_trial_attrs(self.storage, trial._trial_id, user=attrs, system=constraint),
            trial,
        )
        self._finish(trial, objective_values(result, self.config.objective), TrialState.COMPLETE)
        self._show(trial, view_from(trial.number, attrs, feasible=constraint[CONSTRAINT_KEY] <= 0))
        self._log(
            f"trial {trial.number} complete [{used}/{self.n_trials}]: {config.arch} "
            f"val {result.val_accuracy[-1]:.4f} test {result.test_accuracy:.4f}, "
            f"{result.active_blocks}/{config.depth} blocks, {result.active_params} params, "
            f"{seconds:.1f}s"
        )
        return "complete"

    def _run_batch(self, claimed: list[tuple[optuna.Trial, int]]) -> Counter[str]:
        """Train ``claimed`` in groups of one shape, each group as one population; book every
        trial on its own. A stop signal hands every unfinished trial back."""
        counts: Counter[str] = Counter()
        open_trials = {trial._trial_id: trial for trial, _ in claimed}
        heartbeat = Heartbeat(
            self.storage, list(open_trials), self.settings.heartbeat_interval, self._say
        )
        try:
            with heartbeat:
                for outcome, trial in self._train_batch(claimed):
                    counts[outcome] += 1
                    open_trials.pop(trial._trial_id, None)
                    heartbeat.discard(trial._trial_id)
        except WorkerStopped as e:
            for trial in open_trials.values():
                self._requeue(trial, f"its worker was stopped by {e.signal_name}", quick=True)
            raise
        return counts

    def _train_batch(
        self, claimed: list[tuple[optuna.Trial, int]]
    ) -> Iterator[tuple[str, optuna.Trial]]:
        start = time.perf_counter()
        groups: dict[tuple[object, ...], list[tuple[optuna.Trial, int, TrainConfig]]] = {}
        for trial, used in claimed:
            try:
                config, grid = self._prepare(trial)
            except Exception as e:
                yield self._book(trial, e, used, 0.0), trial
                continue
            groups.setdefault((*group_key(config), grid), []).append((trial, used, config))
        single = len(self.study.directions) == 1
        for key, members in groups.items():
            grid = bool(key[-1])
            reporters = [self._reporter(t) if single and not grid else None for t, _, _ in members]

            def on_epoch(
                index: int,
                stats: EpochStats,
                reporters: list[Callable[[EpochStats], None] | None] = reporters,
            ) -> None:
                report = reporters[index]
                if report is not None:
                    report(stats)

            numbers = ", ".join(str(t.number) for t, _, _ in members)
            name = f"trials {numbers}" if len(members) > 1 else f"trial {numbers}"
            results = train_population(
                [c for _, _, c in members],
                self.dataset(members[0][2].dataset),
                device=self.device,
                on_epoch=on_epoch,
                progress=not self.options.quiet,
                label=f"[worker {self.sampler_seed:x}] {name}",
                test_every_epoch=grid,
            )
            seconds = time.perf_counter() - start
            for (trial, used, _), result in zip(members, results, strict=True):
                yield self._book(trial, result, used, seconds), trial

    def _book(
        self, trial: optuna.Trial, result: TrainResult | Exception, used: int, seconds: float
    ) -> str:
        """Store a trial's result or book what ended it; a trial that another worker finished
        meanwhile (this one stalled) is dropped."""
        try:
            if isinstance(result, TrainResult):
                return self._store(trial, result, used, seconds)
            return self._ended(trial, result, used)
        except _FinishedElsewhereError:
            self._say(
                f"trial {trial.number} was finished by another worker while this one stalled "
                "(its heartbeat went stale); this worker's result is dropped"
            )
            return "dropped"

    def _show(self, trial: optuna.Trial | None = None, view: TrialView | None = None) -> None:
        """The note of ``trial`` (drawn from ``view``) and, at most every PUBLISH_EVERY seconds
        or without a trial, the study's figures on the dashboard. Drawing is a courtesy: a
        failure is logged and never touches the trial. The figures read every trial: in a
        large study drawing them takes long, so the interval grows to 20 times the last
        drawing's time, which keeps it under 5 % of the worker's time."""
        try:
            if trial is not None and view is not None:
                write_trial_note(trial, trial_note(view))
            now = time.monotonic()
            if trial is None or now - self._published >= self._publish_every:
                publish(self.study)
                self._published = time.monotonic()
                self._publish_every = max(PUBLISH_EVERY, 20 * (self._published - now))
        except Exception as e:
            self._say(f"could not update the dashboard's figures ({type(e).__name__}: {e})")

    def _guarded(self, what: str, fn: Callable[[], T], trial: optuna.Trial) -> T:
        """A storage call on a running trial: retried, and a trial that another worker has
        finished meanwhile (this worker stalled past the grace period) ends this attempt."""
        try:
            return self._db(what, fn)
        except optuna.exceptions.UpdateFinishedTrialError as e:
            raise _FinishedElsewhereError() from e

    def _finish(self, trial: optuna.Trial, values: list[float] | None, state: TrialState) -> None:
        """``tell``, retried. If a retry finds the trial finished, it was this worker's own
        earlier attempt that got through (same state) or another worker's (dropped)."""
        try:
            self._db("storing the result", lambda: self.study.tell(trial, values, state=state))
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError) as e:
            now = self._db("reading the trial", lambda: self.storage.get_trial(trial._trial_id))
            if now.state != state:
                raise _FinishedElsewhereError() from e

    def _reporter(self, trial: optuna.Trial) -> Callable[[EpochStats], None]:
        def report(stats: EpochStats) -> None:
            self._guarded("reporting", lambda: trial.report(stats.val_accuracy, stats.epoch), trial)
            if self._guarded("asking the pruner", trial.should_prune, trial):
                raise optuna.TrialPruned()

        return report

    def _fail(self, trial: optuna.Trial, reason: str, used: int) -> str:
        """The trial's own failure: it stays failed and uses its budget."""
        self._guarded(
            "storing the failure", lambda: trial.set_user_attr(FAIL_REASON_ATTR, reason), trial
        )
        self._finish(trial, None, TrialState.FAIL)
        self._log(f"trial {trial.number} failed [{used}/{self.n_trials}]: {reason}")
        return "failed"

    def _requeue(self, trial: optuna.Trial, reason: str, *, quick: bool = False) -> None:
        """Fail ``trial`` through no fault of its own and queue it again with the same
        parameters and seed (Optuna's retry callback, as for a dead worker's trial)."""
        storage, trial_id = self.storage, trial._trial_id

        def requeue() -> None:
            storage.set_trial_user_attr(trial_id, RETRY_REASON_ATTR, reason)
            if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                callback = storage.get_heartbeat_stale_trial_callback()
                if callback is not None:
                    callback(self.study, storage.get_trial(trial_id))

        # On a stop signal, do not wait minutes for a database that is away: if this fails,
        # the trial's heartbeat goes stale and another worker retries it after the grace period.
        policy = RetryPolicy(limit=10.0) if quick else self.options.retry
        try:
            policy.call("queueing the trial again", requeue, self._say)
        except optuna.exceptions.UpdateFinishedTrialError:
            return  # finished by another worker already
        except StorageError as e:
            self._say(f"trial {trial.number} could not be queued again ({e}); it is retried "
                      "once its heartbeat is stale")  # fmt: skip
            return
        self._say(f"trial {trial.number} failed and queued again: {reason}")

    def _save_model(self, trial: optuna.Trial, result: TrainResult) -> str | None:
        """Store the trained network as an artifact. A disk failure fails the trial and queues
        it again (not its fault); several in a row stop the worker."""
        dataset = self.dataset(result.config.dataset)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"trial-{trial.number}.pt"
                save_checkpoint(result, dataset.in_features, dataset.num_classes, path)
                artifact_id = self._guarded(
                    "storing the model",
                    lambda: upload_artifact(
                        artifact_store=self.store, file_path=str(path), study_or_trial=trial
                    ),
                    trial,
                )
        except OSError as e:
            self._save_failures += 1
            reason = f"cannot save its model to {self.options.artifact_dir}: {e.strerror or e}"
            self._requeue(trial, reason)
            if self._save_failures >= _MAX_SAVE_FAILURES:
                raise StorageError(
                    f"{_MAX_SAVE_FAILURES} models in a row could not be saved to "
                    f"{self.options.artifact_dir} ({e.strerror or e}); fix the folder or choose "
                    "another --artifact-dir"
                ) from e
            return None
        self._save_failures = 0
        return str(artifact_id)
