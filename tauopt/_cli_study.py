"""``tauopt create`` (a study from a config, or its budget raised) and ``tauopt worker`` (trials
trained until the budget is spent); ``tauopt run`` (:mod:`tauopt._cli_run`) does both."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tauopt._cli_args import (
    FROM_CONFIG,
    add_artifacts,
    add_command,
    add_heartbeat,
    add_precision,
    add_retry,
    add_storage,
    add_threads,
    at_most,
    dataset_name,
    non_negative_int,
    non_negative_seconds,
    positive_int,
    seed,
    warn,
    warn_threads,
)
from tauopt.engine import DATASETS, DEFAULT_VAL_CAP, RawDataset
from tauopt.storage import RetryPolicy, StorageSettings, default_artifact_dir, redact, resolve_url
from tauopt.study import (
    CONFIG_ATTR,
    DEFAULT_STOP_GRACE,
    DEFAULT_TRAIN_SIZE,
    MAX_STOP_GRACE,
    OBJECTIVES,
    StudyConfig,
    TrialBudget,
    Worker,
    WorkerOptions,
    WorkerSummary,
    create_study,
    load_config,
    load_study,
    parse_config,
    settle,
    study_dataset,
)

stop_grace = at_most(non_negative_seconds, MAX_STOP_GRACE, f"must be at most {MAX_STOP_GRACE:g} s")


def add_create(sub: Any) -> None:
    p = add_command(
        sub, "create", "create the schema and a study from a config (or raise its budget)"
    )
    add_storage(p)
    add_create_flags(p)
    add_retry(p)
    p.set_defaults(handler=_cmd_create)


def add_worker(sub: Any) -> None:
    p = add_command(
        sub,
        "worker",
        "join a study and run trials until its budget is spent",
        "Join a study created by `tauopt create` and train its trials until the study's "
        "budget is spent; start as many workers as you like, on any machine that reaches the "
        "storage.",
    )
    add_storage(p)
    add_worker_flags(p)
    add_heartbeat(p)
    p.set_defaults(handler=_cmd_worker)


def add_create_flags(p: argparse.ArgumentParser) -> None:
    """What a study is made of: its config and the command line's changes to it."""
    budget, study = TrialBudget(), StudyConfig(search={})
    p.add_argument(
        "--config", type=Path, default=None, help="study config (TOML; default: built-in)"
    )
    p.add_argument(
        "--n-trials",
        type=positive_int,
        default=None,
        help=f"total trials across all workers; may be raised on an existing study "
        f"({FROM_CONFIG} {study.n_trials})",
    )
    p.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help=f"epochs per trial ({FROM_CONFIG} {budget.epochs})",
    )
    p.add_argument(
        "--train-size",
        type=non_negative_int,
        default=None,
        help=f"training images per trial, 0 for all that the validation images leave "
        f"({FROM_CONFIG} {DEFAULT_TRAIN_SIZE:,}, or all where fewer)",
    )
    p.add_argument(
        "--val-size",
        type=positive_int,
        default=None,
        help="validation images held out of the training split, which trials are selected on "
        f"({FROM_CONFIG} a fifth of the training split, at most {DEFAULT_VAL_CAP:,})",
    )
    p.add_argument(
        "--dataset",
        type=dataset_name,
        default=None,
        help=f"{', '.join(DATASETS)}, or an .npz file ({FROM_CONFIG} {budget.dataset})",
    )
    p.add_argument(
        "--normalize",
        action="store_true",
        # None when not given: the config's setting stands (False would override it)
        default=None,
        help="standardise every input feature by the training split's mean and std, for "
        "features not scaled to [0, 1] (default: from the config, else off)",
    )
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=None,
        help=f"({FROM_CONFIG} {study.objective})",
    )
    add_heartbeat(p)


def add_worker_flags(p: argparse.ArgumentParser) -> None:
    """How a worker trains: data, device, threads, trials at once, stopping, storage."""
    p.add_argument(
        "--data-dir", type=Path, default=None, help="dataset root (default: $TAUOPT_DATA or ./data)"
    )
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument(
        "--sampler-seed",
        type=seed,
        default=None,
        help="this worker's sampler seed, 0 to 2**32 - 1 (default: random)",
    )
    p.add_argument("--quiet", action="store_true", help="no per-trial and per-epoch progress")
    add_threads(p)
    p.add_argument(
        "--batch-trials",
        type=positive_int,
        default=1,
        metavar="K",
        help="claim up to K trials at once and train those of one shape together as one "
        "batched computation (results equal to training each alone); see the README's "
        "trials-per-hour figures for a K that pays off on your hardware",
    )
    p.add_argument(
        "--stop-grace",
        type=stop_grace,
        default=DEFAULT_STOP_GRACE,
        metavar="S",
        help="on SIGTERM or SIGINT, save the running trials' states at the end of the current "
        "batch, or at the end of the epoch if that comes within S seconds, then hand them back "
        f"(default {DEFAULT_STOP_GRACE:g}: half of a 30-s preemption notice)",
    )
    add_precision(p, None)
    add_retry(p)
    add_artifacts(p)


def _settings(url: str | None, interval: int, grace: int | None) -> StorageSettings:
    return StorageSettings(url=resolve_url(url), heartbeat_interval=interval, grace_period=grace)


def study_config(args: argparse.Namespace) -> StudyConfig:
    """The config file (or the built-in one) with the command line's settings."""
    return load_config(args.config).with_overrides(
        n_trials=args.n_trials,
        epochs=args.epochs,
        train_size=args.train_size,
        val_size=args.val_size,
        dataset=args.dataset,
        normalize=args.normalize,
        objective=args.objective,
        heartbeat_interval=args.heartbeat_interval,
        grace_period=args.grace_period,
    )


def storage_settings(args: argparse.Namespace, config: StudyConfig) -> StorageSettings:
    return _settings(args.storage, config.heartbeat_interval, config.grace_period)


def create(
    args: argparse.Namespace, config: StudyConfig, dataset: RawDataset | None
) -> StudyConfig:
    """Create the study (or raise its budget); ``dataset``: its data where loaded (a user's
    .npz file must be). Returns the config as stored."""
    config = settle(config, dataset)
    settings = storage_settings(args, config)
    # Retried whole (it is idempotent): under compose a healthy database may still drop the
    # first connections, and a one-shot `create` that gives up stops every worker behind it.
    retry = RetryPolicy(limit=args.storage_retry_seconds)
    retry.call(
        "creating the study",
        lambda: create_study(settings, args.study, config, dataset=dataset),
        warn,
        first=True,
    )
    print(
        f"study {args.study!r} ready in {redact(settings.url)}: {config.objective} objective, "
        f"{config.n_trials} trials of {config.trial.epochs} epochs on {config.trial.dataset} "
        f"({_images(config.trial.train_size)} training, {config.trial.val_size:,} validation "
        "images)",
        file=sys.stderr,
    )
    return config


def _images(train_size: int | None) -> str:
    return f"{train_size:,}" if train_size else "all"


def _cmd_create(args: argparse.Namespace) -> int:
    config = study_config(args)
    create(args, config, study_dataset(config, None))
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    report_stop(args, run_worker(args, None))
    return 0


def report_stop(args: argparse.Namespace, summary: WorkerSummary) -> bool:
    """One line if a signal stopped the worker (the exit status stays 0: a stop is no error)."""
    if summary.stopped:
        print(
            f"tauopt {args.command}: stopped by {summary.stopped} after {summary.complete} "
            "complete trials here; the trial it was running is queued again for the next worker",
            file=sys.stderr,
        )
    return summary.stopped is not None


def run_worker(args: argparse.Namespace, dataset: RawDataset | None) -> WorkerSummary:
    """One worker on the study until its budget is spent (or a signal stops it)."""
    url = resolve_url(args.storage)
    retry = RetryPolicy(limit=args.storage_retry_seconds)
    study = retry.call("loading the study", lambda: load_study(url, args.study), warn, first=True)
    warn_threads(args.threads)
    attrs = retry.call("reading the study's config", lambda: study.user_attrs, warn)
    stored = parse_config(attrs.get(CONFIG_ATTR, {}))
    settings = _settings(
        url,
        stored.heartbeat_interval if args.heartbeat_interval is None else args.heartbeat_interval,
        stored.grace_period if args.grace_period is None else args.grace_period,
    )
    options = WorkerOptions(
        data_dir=args.data_dir,
        device=args.device,
        artifact_dir=args.artifact_dir or default_artifact_dir(url),
        sampler_seed=args.sampler_seed,
        quiet=args.quiet,
        threads=args.threads,
        retry=retry,
        batch_trials=args.batch_trials,
        precision=args.precision,
        stop_grace=args.stop_grace,
    )
    summary = Worker(settings, args.study, options, dataset=dataset).run()
    extra = "".join(
        f", {n} {what}"
        for n, what in ((summary.requeued, "queued again"), (summary.dropped, "dropped"))
        if n
    )
    print(
        f"worker finished: {summary.trials_run} trials here ({summary.complete} complete, "
        f"{summary.pruned} pruned, {summary.failed} failed{extra})",
        file=sys.stderr,
    )
    return summary
