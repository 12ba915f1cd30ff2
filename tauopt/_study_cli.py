"""Study commands of the CLI: create, worker, run, best, export, dashboard."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import shutil
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tauopt._cli import add_precision, add_threads, dataset_name, warn_threads
from tauopt._cli import positive_float as _positive_float
from tauopt._cli import positive_int as _positive_int
from tauopt.engine._config import DEFAULT_VAL_CAP
from tauopt.engine._data import DATASETS
from tauopt.errors import ConfigError, TauoptError
from tauopt.storage import StorageSettings
from tauopt.study import OBJECTIVES, PROTOCOLS, StudyConfig, TrialBudget
from tauopt.study._config import DEFAULT_TRAIN_SIZE
from tauopt.study._reproduce import DATASETS as PAPER_DATASETS
from tauopt.study._worker import DEFAULT_STOP_GRACE, MAX_STOP_GRACE

if TYPE_CHECKING:
    from tauopt.engine import RawDataset
    from tauopt.study import BestTrials, WorkerSummary

DEFAULT_STUDY = "tauopt"
#: `tauopt reproduce`'s study: not the main job's, so the two never mix.
REPRODUCE_STUDY = "paper"
MAX_SEEDS = 100
_FROM_CONFIG = "default: the config's, else built-in"


def _add_storage(p: argparse.ArgumentParser, study: str = DEFAULT_STUDY) -> None:
    p.add_argument(
        "--storage",
        default=None,
        help="database URL (default: $TAUOPT_STORAGE, else sqlite:///./tauopt.db)",
    )
    p.add_argument("--study", type=_study_name, default=study, help="study name")


def _add_artifacts(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--artifact-dir",
        type=Path,
        default=None,
        help="trained models (default: $TAUOPT_ARTIFACTS, else tauopt-artifacts beside the "
        "SQLite file)",
    )


def _add_heartbeat(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--heartbeat-interval",
        type=_positive_int,
        default=None,
        help=f"seconds between heartbeats ({_FROM_CONFIG} {StorageSettings.heartbeat_interval})",
    )
    p.add_argument(
        "--grace-period",
        type=_positive_int,
        default=None,
        help=f"seconds of silence before a trial is failed ({_FROM_CONFIG} twice the interval)",
    )


def _add_create_flags(p: argparse.ArgumentParser) -> None:
    budget, study = TrialBudget(), StudyConfig(search={})
    p.add_argument(
        "--config", type=Path, default=None, help="study config (TOML; default: built-in)"
    )
    p.add_argument(
        "--n-trials",
        type=_positive_int,
        default=None,
        help=f"total trials across all workers; may be raised on an existing study "
        f"({_FROM_CONFIG} {study.n_trials})",
    )
    p.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help=f"epochs per trial ({_FROM_CONFIG} {budget.epochs})",
    )
    p.add_argument(
        "--train-size",
        type=_non_negative_int,
        default=None,
        help=f"training images per trial, 0 for all that the validation images leave "
        f"({_FROM_CONFIG} {DEFAULT_TRAIN_SIZE:,}, or all where fewer)",
    )
    p.add_argument(
        "--val-size",
        type=_positive_int,
        default=None,
        help="validation images held out of the training split, which trials are selected on "
        f"({_FROM_CONFIG} a fifth of the training split, at most {DEFAULT_VAL_CAP:,})",
    )
    p.add_argument(
        "--dataset",
        type=dataset_name,
        default=None,
        help=f"{', '.join(DATASETS)}, or an .npz file ({_FROM_CONFIG} {budget.dataset})",
    )
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=None,
        help=f"({_FROM_CONFIG} {study.objective})",
    )
    _add_heartbeat(p)


def _add_worker_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir", type=Path, default=None, help="dataset root (default: $TAUOPT_DATA or ./data)"
    )
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument(
        "--sampler-seed",
        type=_seed,
        default=None,
        help="this worker's sampler seed, 0 to 2**32 - 1 (default: random)",
    )
    p.add_argument("--quiet", action="store_true", help="no per-trial and per-epoch progress")
    add_threads(p)
    p.add_argument(
        "--batch-trials",
        type=_positive_int,
        default=1,
        metavar="K",
        help="claim up to K trials at once and train those of one shape together as one "
        "batched computation (results equal to training each alone); see the README's "
        "trials-per-hour figures for a K that pays off on your hardware",
    )
    p.add_argument(
        "--stop-grace",
        type=_stop_grace,
        default=DEFAULT_STOP_GRACE,
        metavar="S",
        help="on SIGTERM or SIGINT, save the running trials' states at the end of the current "
        "batch, or at the end of the epoch if that comes within S seconds, then hand them back "
        f"(default {DEFAULT_STOP_GRACE:g}: half of a 30-s preemption notice)",
    )
    add_precision(p, None)
    _add_retry(p)
    _add_artifacts(p)


def _add_retry(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-retry-seconds",
        type=_non_negative,
        default=300.0,
        help="how long to ride out a database that does not answer (a restart, dropped "
        "connections, a server still starting) before giving up",
    )


def _seed(text: str) -> int:
    value = _non_negative_int(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be below 2**32 = {2**32}, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _stop_grace(text: str) -> float:
    value = _non_negative(text)
    if value > MAX_STOP_GRACE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_STOP_GRACE:g} s, got {text!r}")
    return value


def _study_name(text: str) -> str:
    from tauopt.storage import MAX_STUDY_NAME

    if not text.strip():
        raise argparse.ArgumentTypeError("a study name cannot be empty")
    if len(text) > MAX_STUDY_NAME:
        raise argparse.ArgumentTypeError(
            f"a study name has at most {MAX_STUDY_NAME} characters, got {len(text)}"
        )
    return text


def add_study_commands(sub: Any, formatter: type[argparse.HelpFormatter]) -> None:
    """Register the study subcommands on ``sub``."""

    def parser(name: str, summary: str, description: str | None = None) -> Any:
        return sub.add_parser(
            name, help=summary, description=description or summary, formatter_class=formatter
        )

    p = parser("create", "create the schema and a study from a config (or raise its budget)")
    _add_storage(p)
    _add_create_flags(p)
    _add_retry(p)
    p.set_defaults(handler=_cmd_create)

    p = parser(
        "worker",
        "join a study and run trials until its budget is spent",
        "Join a study created by `tauopt create` and train its trials until the study's "
        "budget is spent; start as many workers as you like, on any machine that reaches the "
        "storage.",
    )
    _add_storage(p)
    _add_worker_flags(p)
    _add_heartbeat(p)
    p.set_defaults(handler=_cmd_worker)

    p = parser(
        "run",
        "create a study and run one local worker (the main job)",
        "Create (or resume) a study and run one worker here until the budget is spent; then "
        "print the Pareto-optimal trials and how to look at them.",
    )
    _add_storage(p)
    _add_create_flags(p)
    _add_worker_flags(p)
    p.set_defaults(handler=_cmd_run)

    p = parser("best", "the Pareto-optimal (or best) trials")
    _add_storage(p)
    _add_artifacts(p)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(handler=_cmd_best)

    p = parser("export", "all trials as CSV")
    _add_storage(p)
    p.add_argument(
        "--output",
        "-o",
        type=Path,
        default=None,
        help="CSV file, gzipped where the name ends in .gz (default: stdout)",
    )
    p.set_defaults(handler=_cmd_export)

    p = parser(
        "reproduce",
        "enqueue the papers' experiment grid as the trials of one study",
        "Enqueue the papers' experiments as the trials of one study, exactly once (an "
        "interrupted call, run again, adds only what is missing); then run them with `tauopt "
        "worker` (any number) and read them with `tauopt report`. --protocol authors (the "
        "default) is the grid of the papers' published code: per dataset and seed 26 ResNet "
        "and 12 Fractional DNN runs, 200 epochs on all 60,000 training images; --protocol "
        "tauopt is a wider grid on tauopt's own variants (5 epochs on 10,000 images); "
        "--protocol lr-matched trains fixed, input-fixed and trainable taus at three learning "
        "rates (200 epochs, 10,000 images held out to pick each arm's rate). A seed draws a "
        "run's weights, batch order and validation split; the runs of one seed share them.",
    )
    _add_storage(p, study=REPRODUCE_STUDY)
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="authors",
        help="which grid: the authors' code, tauopt's variants, T against the learning rate "
        "(T in {1, 6} at equal lr * T), or fixed against trainable taus at matched learning "
        "rates",
    )
    p.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="epochs per run (default: the protocol's, 200 or 5)",
    )
    p.add_argument(
        "--train-size",
        type=_non_negative_int,
        default=None,
        help="training images per run, 0 for all (default: the protocol's, all or 10,000)",
    )
    p.add_argument(
        "--seeds",
        type=_positive_int,
        default=1,
        help=f"runs of every setting (at most {MAX_SEEDS}); the authors ran one",
    )
    p.add_argument(
        "--rates",
        type=_positive_float,
        nargs="+",
        default=None,
        metavar="LR",
        help="lr-matched: the learning rates at T = 1 (default 0.01 0.03 0.1; T = 6 runs come "
        "with 0.01 only): more rates as a study of their own, reported with the first",
    )
    p.add_argument(
        "--first-seed",
        type=_non_negative_int,
        default=0,
        help="the first seed (default 0): a long grid runs in parts, one study per range of "
        "seeds, and `tauopt report` reads them as one",
    )
    p.add_argument(
        "--datasets",
        nargs="+",
        choices=tuple(DATASETS),
        default=list(PAPER_DATASETS),
        help=f"which datasets (default: the papers', {' and '.join(PAPER_DATASETS)})",
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=("fixed-vs-trainable", "pruning"),
        default=[],
        help="only these cells of the grid: fixed against trainable taus with nothing else on, "
        "or the ResNet with l1 and pruning off against on (default: the whole grid)",
    )
    p.set_defaults(handler=_cmd_reproduce)

    p = parser(
        "report",
        "figures (PNG) and report.md of a study",
        "Write the study's figures as PNG files and a report.md that answers, from its trials, "
        "which T is best, l1 against the horizon penalty, and whether pruning changes the gap "
        "between validation and test accuracy; also puts the figures on the dashboard. A grid "
        "of `tauopt reproduce` may be reported from several studies at once (a long grid run "
        "in parts) or from exported trials (--trials), without its database.",
    )
    p.add_argument(
        "--storage",
        default=None,
        help="database URL (default: $TAUOPT_STORAGE, else sqlite:///./tauopt.db)",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--study",
        type=_study_name,
        nargs="+",
        default=[DEFAULT_STUDY],
        help="study name; several grid studies are reported as one grid",
    )
    source.add_argument(
        "--trials",
        type=Path,
        nargs="+",
        metavar="CSV",
        help="exports of grid studies (`tauopt export`, .csv or .csv.gz) instead of a database",
    )
    p.add_argument("--out", type=Path, required=True, help="folder for the files")
    p.set_defaults(handler=_cmd_report)

    p = parser(
        "proxy",
        "serve a database to workers through Optuna's gRPC storage proxy",
        "Serve the database of --storage through Optuna's gRPC storage proxy, with Optuna's "
        "cache in front of it: every command then takes --storage grpc://HOST:PORT, and a "
        "worker host needs only that address, no database credentials. The proxy holds the "
        "database connections, so hundreds of workers share a few. With $TAUOPT_PROXY_SECRET "
        "set, it takes only calls that present the same secret (set it on every worker "
        "host); without one, anyone who reaches its port can read, change and delete every "
        "study.",
    )
    p.add_argument(
        "--storage",
        default=None,
        help="the database to serve (default: $TAUOPT_STORAGE, else sqlite:///./tauopt.db)",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address")
    p.add_argument("--port", type=int, default=13000, help="port")
    p.add_argument(
        "--db-connections",
        type=_positive_int,
        default=8,
        metavar="N",
        help="database connections the proxy holds at most (>= 2; docs/deployment.md says how "
        "to size it)",
    )
    p.set_defaults(handler=_cmd_proxy)

    p = parser(
        "dashboard",
        "optuna-dashboard on the same storage and artifacts",
        "optuna-dashboard on the same storage and artifacts. It answers only requests for "
        "the address it listens on, localhost, an IP address or a name given with "
        "--allow-host (a web page cannot reach it by DNS rebinding). Give the storage's "
        "password in $TAUOPT_STORAGE or libpq's PGPASSWORD rather than on the command line, "
        "where `ps` shows it.",
    )
    p.add_argument("--storage", default=None, help="database URL (as for the other commands)")
    _add_artifacts(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address")
    p.add_argument("--port", type=int, default=8080, help="port")
    p.add_argument(
        "--read-only",
        action="store_true",
        help="refuse every change: no study, trial or note can be deleted or edited",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests for this host name (the name users type in the browser)",
    )
    p.set_defaults(handler=_cmd_dashboard)


def _settings(url: str | None, interval: int, grace: int | None) -> StorageSettings:
    from tauopt.storage import StorageSettings, resolve_url

    return StorageSettings(url=resolve_url(url), heartbeat_interval=interval, grace_period=grace)


def _study_config(args: argparse.Namespace) -> StudyConfig:
    """The config file (or the built-in one) with the command line's settings."""
    from tauopt.study import load_config

    return load_config(args.config).with_overrides(
        n_trials=args.n_trials,
        epochs=args.epochs,
        train_size=args.train_size,
        val_size=args.val_size,
        dataset=args.dataset,
        objective=args.objective,
        heartbeat_interval=args.heartbeat_interval,
        grace_period=args.grace_period,
    )


def _storage_settings(args: argparse.Namespace, config: StudyConfig) -> StorageSettings:
    return _settings(args.storage, config.heartbeat_interval, config.grace_period)


def _create(
    args: argparse.Namespace, config: StudyConfig, dataset: RawDataset | None
) -> StudyConfig:
    """Create the study (or raise its budget); ``dataset``: its data where loaded (a user's
    .npz file must be). Returns the config as stored."""
    from tauopt.storage import RetryPolicy, redact
    from tauopt.study import create_study
    from tauopt.study._create import settle

    config = settle(config, dataset)
    settings = _storage_settings(args, config)
    # Retried whole (it is idempotent): under compose a healthy database may still drop the
    # first connections, and a one-shot `create` that gives up stops every worker behind it.
    retry = RetryPolicy(limit=args.storage_retry_seconds)
    retry.call(
        "creating the study",
        lambda: create_study(settings, args.study, config, dataset=dataset),
        _warn,
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
    from tauopt.study._create import study_dataset

    config = _study_config(args)
    _create(args, config, study_dataset(config, None))
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    _report_stop(args, _run_worker(args, None))
    return 0


def _report_stop(args: argparse.Namespace, summary: WorkerSummary) -> bool:
    """One line if a signal stopped the worker (the exit status stays 0: a stop is no error)."""
    if summary.stopped:
        print(
            f"tauopt {args.command}: stopped by {summary.stopped} after {summary.complete} "
            "complete trials here; the trial it was running is queued again for the next worker",
            file=sys.stderr,
        )
    return summary.stopped is not None


def _run_worker(args: argparse.Namespace, dataset: RawDataset | None) -> WorkerSummary:
    from tauopt.storage import RetryPolicy, default_artifact_dir, resolve_url
    from tauopt.study import Worker, WorkerOptions, load_study, parse_config
    from tauopt.study._record import CONFIG_ATTR

    url = resolve_url(args.storage)
    retry = RetryPolicy(limit=args.storage_retry_seconds)
    study = retry.call("loading the study", lambda: load_study(url, args.study), _warn, first=True)
    warn_threads(args.threads)
    attrs = retry.call("reading the study's config", lambda: study.user_attrs, _warn)
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


def _warn(message: str) -> None:
    print(f"tauopt: {message}", file=sys.stderr, flush=True)


def program() -> str:
    """How to run tauopt again from the shell that ran this one: ``tauopt`` where the PATH
    finds this installation, else this executable's path (``.venv/bin/tauopt`` after
    ``make run``), else ``python -m tauopt`` with this interpreter."""
    here = Path(sys.argv[0])
    found = shutil.which("tauopt")
    if here.name == "tauopt" and here.is_file():
        if found and Path(found).resolve() == here.resolve():
            return "tauopt"
        try:
            return shlex.quote(str(here.resolve().relative_to(Path.cwd().resolve())))
        except ValueError:
            return shlex.quote(str(here.resolve()))
    return f"{shlex.quote(sys.executable)} -m tauopt"


#: The settings of ``tauopt run`` that a command printed for what comes next carries over:
#: (flag, dest). Without them the printed command would describe another study (and be
#: refused), or look for the data elsewhere.
_RUN_SETTINGS = (
    ("--config", "config"),
    ("--dataset", "dataset"),
    ("--epochs", "epochs"),
    ("--train-size", "train_size"),
    ("--val-size", "val_size"),
    ("--objective", "objective"),
    ("--heartbeat-interval", "heartbeat_interval"),
    ("--grace-period", "grace_period"),
    ("--device", "device"),
    ("--threads", "threads"),
    ("--precision", "precision"),
)


def _storage_flag(args: argparse.Namespace, shown: str) -> str:
    """``--storage`` as given, or as ``$TAUOPT_STORAGE`` set it (a shell without it would
    look in ./tauopt.db)."""
    given = args.storage is not None or os.environ.get("TAUOPT_STORAGE")
    return f" --storage {shlex.quote(shown)}" if given else ""


def _data_dir(args: argparse.Namespace) -> str | None:
    """The data root this run read: ``--data-dir``, else ``$TAUOPT_DATA`` (``TAUOPT_DATA=...
    make run`` sets it for one command only), else None (./data)."""
    if args.data_dir is not None:
        return str(args.data_dir)
    return os.environ.get("TAUOPT_DATA") or None


def _again(args: argparse.Namespace, shown: str, **changes: object) -> str:
    """``tauopt run`` with this run's settings (``changes`` replacing some, by dest), spelled
    for the shell this run was started in."""
    values = {dest: getattr(args, dest) for _, dest in _RUN_SETTINGS}
    values["n_trials"] = args.n_trials
    values["study"] = None if args.study == DEFAULT_STUDY else args.study
    values["data_dir"] = _data_dir(args)
    values["artifact_dir"] = args.artifact_dir or os.environ.get("TAUOPT_ARTIFACTS") or None
    values["batch_trials"] = None if args.batch_trials == 1 else args.batch_trials
    values.update(changes)
    flags = (
        ("--study", "study"),
        ("--n-trials", "n_trials"),
        *_RUN_SETTINGS,
        ("--data-dir", "data_dir"),
        ("--artifact-dir", "artifact_dir"),
        ("--batch-trials", "batch_trials"),
    )
    words = [
        f"{flag} {shlex.quote(str(values[dest]))}"
        for flag, dest in flags
        if values[dest] is not None
    ]
    if args.quiet:
        words.append("--quiet")
    return " ".join([f"{program()} run{_storage_flag(args, shown)}", *words])


def _load_data(args: argparse.Namespace, config: StudyConfig) -> RawDataset:
    """The study's data, read (a named dataset downloaded where missing) before anything is
    changed: a run that cannot find its data leaves the study as it was."""
    from tauopt.engine import load_dataset
    from tauopt.study._create import check_change, settle, study_dataset

    own = study_dataset(config, args.data_dir)  # a user's file: read and checked
    # What create would refuse, refused first: the data of a study this run does not match
    # may not even be here.
    check_change(_storage_settings(args, config), args.study, settle(config, own))
    return own if own is not None else load_dataset(config.trial.dataset, args.data_dir)


def _cmd_run(args: argparse.Namespace) -> int:
    from tauopt.storage import default_artifact_dir, redact, resolve_url
    from tauopt.study import best_trials

    config = _study_config(args)
    dataset = _load_data(args, config)
    config = _create(args, config, dataset)
    summary = _run_worker(args, dataset)
    if _report_stop(args, summary):
        return 0
    url = resolve_url(args.storage)
    shown = redact(url)  # the exact commands for what comes next; never a password
    tauopt = program()
    storage_flag = _storage_flag(args, shown)
    study_flag = "" if args.study == DEFAULT_STUDY else f" --study {shlex.quote(args.study)}"
    if summary.trials_run == 0:
        print(
            f"\nstudy {args.study!r} had used its budget of {config.n_trials} trials already: "
            "nothing new ran. To add trials:\n"
            f"    {_again(args, shown, n_trials=2 * config.n_trials)}\n"
            "to start a new study:\n"
            f"    {_again(args, shown, study=args.study + '-2')}"
        )
    artifacts = (args.artifact_dir or default_artifact_dir(url)).resolve()
    trials = best_trials(url, args.study, artifact_dir=artifacts)
    print()
    _print_best(args.study, trials)
    artifact_flag = f" --artifact-dir {shlex.quote(str(artifacts))}"
    print(f"\ntrained models: {artifacts}")
    print(f"dashboard:      {tauopt} dashboard{storage_flag}{artifact_flag}")
    print("                then open http://127.0.0.1:8080/dashboard")
    print(f"table again:    {tauopt} best{storage_flag}{study_flag}")
    if trials:
        python = shlex.quote(sys.executable)
        print(f"best model in Python ({python}, where tauopt is installed):")
        print("    from tauopt import best_trials")
        print(
            f"    best = best_trials({shown!r}, {args.study!r}, artifact_dir={str(artifacts)!r})[0]"
        )
        print(f"    model = best.load_model()   # {_io(dataset)}")
    if shown != url:
        print("(the password is masked above: pass the real URL, or set $TAUOPT_STORAGE)")
    return 0


def _io(dataset: RawDataset) -> str:
    """What the study's models take and give, from its dataset: ``logits (N, 10) of images
    (N, 28, 28) or rows (N, 784)``."""
    rows = f"rows (N, {dataset.in_features})"
    shape = ", ".join(str(d) for d in dataset.shape)
    inputs = f"images (N, {shape}) or {rows}" if len(dataset.shape) > 1 else rows
    return f"logits (N, {dataset.num_classes}) of {inputs}"


def _print_best(study: str, trials: BestTrials) -> None:
    if not trials:
        print(trials.why_empty or f"study {study!r} has no best trial")
        return
    print(f"Pareto-optimal trials of study {study!r} (best validation accuracy first):")
    header = (
        f"{'trial':>5}  {'val acc':>7}  {'test acc':>8}  {'blocks':>6}  {'active params':>13}  "
        "hyperparameters"
    )
    print(header)
    for t in trials:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(t.params.items()))
        print(
            f"{t.number:>5}  {t.val_accuracy:>7.4f}  {t.test_accuracy:>8.4f}  "
            f"{t.active_blocks:>6}  {t.active_params:>13}  {params}"
        )


def _cmd_best(args: argparse.Namespace) -> int:
    from tauopt.study import best_trials

    trials = best_trials(args.storage, args.study, artifact_dir=args.artifact_dir)
    if args.json:
        json.dump([t.to_dict() for t in trials], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    _print_best(args.study, trials)
    return 0


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cmd_export(args: argparse.Namespace) -> int:
    from tauopt.study import export_csv

    if args.output is None:
        rows = export_csv(args.storage, args.study, sys.stdout)
    else:
        rows = _export_to_file(args, args.output)
    print(f"exported {rows} trials", file=sys.stderr)
    return 0


def _export_to_file(args: argparse.Namespace, target: Path) -> int:
    """Write the CSV to ``target``. A regular file (or a link to one) is replaced atomically:
    a temporary file beside it, renamed on success, so a failed export (a typo in the study
    name, a lost database) leaves it as it was. A FIFO or a terminal (``/dev/stdout``) is
    written through; anything else that is not a regular file is refused."""
    from tauopt.study import export_csv

    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None  # a new file (or a dangling link's target)
    except OSError as e:
        raise TauoptError(f"cannot write {target}: {e.strerror or e}") from e
    if mode is not None and (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
        try:
            with open(target, "w", newline="") as fh:
                return export_csv(args.storage, args.study, fh)
        except OSError as e:
            raise TauoptError(f"cannot write {target}: {e.strerror or e}") from e
    if mode is not None and not stat.S_ISREG(mode):
        raise TauoptError(
            f"cannot write {target}: not a regular file (a folder, socket or device); choose a "
            "file path with -o, or leave -o out to write to stdout"
        )
    real = Path(os.path.realpath(target))  # a link stays a link; its target is replaced
    partial = real.with_name(f".{real.name}.{os.getpid()}.partial")
    try:
        # a name ending in .gz gets gzip (what `tauopt report --trials` reads back)
        if real.suffix == ".gz":
            with gzip.open(partial, "wt", newline="") as fh:
                rows = export_csv(args.storage, args.study, fh)
        else:
            with open(partial, "w", newline="") as fh:
                rows = export_csv(args.storage, args.study, fh)
        os.replace(partial, real)
    except OSError as e:
        raise TauoptError(
            f"cannot write {target}: {e.strerror or e}; choose a writable file path with -o"
        ) from e
    finally:
        partial.unlink(missing_ok=True)
    return rows


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from tauopt.storage import StorageSettings, redact, resolve_url
    from tauopt.study import enqueue_grid, grid

    if args.seeds > MAX_SEEDS:
        raise ConfigError(f"--seeds {args.seeds}: at most {MAX_SEEDS} runs of every setting")
    runs = grid(
        protocol=args.protocol,
        epochs=args.epochs,
        train_size=args.train_size,
        seeds=args.seeds,
        first_seed=args.first_seed,
        datasets=tuple(args.datasets),
        only=tuple(args.only),
        rates=tuple(args.rates) if args.rates else None,
    )
    spec = {
        "protocol": args.protocol,
        "epochs": runs[0].config.epochs if runs else args.epochs,
        "train_size": runs[0].config.train_size if runs else args.train_size,
        "seeds": args.seeds,
        "first_seed": args.first_seed,
        # what a seed draws: a grid made when seeds shared one batch order is not extended
        "seed_draws": ["weights", "order", "split"],
        "datasets": list(args.datasets),
        "only": list(args.only),
        **({"rates": sorted(set(args.rates))} if args.rates else {}),
    }
    url = resolve_url(args.storage)
    _, enqueued = enqueue_grid(StorageSettings(url=url), args.study, runs, spec)
    what = (
        f"enqueued {enqueued} runs" if enqueued else f"all {len(runs)} runs were enqueued already"
    )
    where = f"{_storage_flag(args, redact(url))} --study {shlex.quote(args.study)}"
    print(
        f"study {args.study!r} in {redact(url)}: {what} ({args.protocol} protocol, "
        f"{spec['epochs']} epochs on {spec['train_size'] or 'all'} images); run them with "
        f"`{program()} worker{where}` (as many as you like), then "
        f"`{program()} report{where} --out report`",
        file=sys.stderr,
    )
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from tauopt.study import load_study, write_grid_report, write_report

    try:
        if args.trials:
            files = write_grid_report(args.out, exports=args.trials)
        elif len(args.study) > 1:
            studies = [load_study(args.storage, name) for name in args.study]
            files = write_grid_report(args.out, studies=studies)
        else:
            files = write_report(load_study(args.storage, args.study[0]), args.out)
    except ValueError as e:
        raise TauoptError(str(e)) from e
    except OSError as e:
        raise TauoptError(f"cannot write the report to {args.out}: {e.strerror or e}") from e
    print(f"wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
    return 0


def _cmd_dashboard(args: argparse.Namespace) -> int:
    import optuna_dashboard

    from tauopt._dashboard import Door, bind, hide_study_attrs, warn_if_public
    from tauopt.storage import (
        StorageSettings,
        artifact_store,
        default_artifact_dir,
        open_storage,
        redact,
        resolve_url,
    )
    from tauopt.study._record import INTERNAL_STUDY_ATTRS

    url = resolve_url(args.storage)
    storage = open_storage(StorageSettings(url=url), create_schema=False)
    hide_study_attrs(storage, INTERNAL_STUDY_ATTRS)
    # The dashboard only reads the models (compose mounts their volume read-only); it makes
    # the folder only where no worker has yet.
    folder = Path(args.artifact_dir or default_artifact_dir(url))
    store = artifact_store(folder, create=not folder.is_dir())
    app = optuna_dashboard.wsgi(storage, artifact_store=store)
    door = Door(app, allowed=[args.host, *args.allow_host], read_only=args.read_only)
    server = bind(door, args.host, args.port)
    warn_if_public(args.host)
    mode = " (read-only)" if args.read_only else ""
    print(
        f"optuna-dashboard{mode} for {redact(url)} on http://{args.host}:{args.port}/dashboard",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def _cmd_proxy(args: argparse.Namespace) -> int:
    from tauopt.storage import StorageSettings, open_storage, redact, resolve_url, serve_proxy
    from tauopt.storage._proxy import SECRET_ENV, bind_address, is_public, proxy_secret

    url = resolve_url(args.storage)
    if url.startswith("grpc://"):
        raise ConfigError(f"--storage {url}: the proxy serves a database, not another proxy")
    secret = proxy_secret()
    bind_address(args.host, args.port)  # before the database: a taken port is one line
    storage = open_storage(
        StorageSettings(url=url, pool_size=args.db_connections), create_schema=True
    )
    if is_public(args.host):
        _warn(
            f"proxy: warning: listening on {args.host}: "
            + (
                "calls must present the shared secret, but it and every study travel "
                "unencrypted: keep the port on a network you trust"
                if secret
                else f"no ${SECRET_ENV} is set, so anyone who reaches this port can read, "
                "change and delete every study (the dashboard's --read-only protects nothing "
                "while they can); set one, or bind to 127.0.0.1"
            )
        )

    def ready() -> None:
        bare = args.host.strip("[]")
        host = f"[{bare}]" if ":" in bare else bare
        guard = "shared secret required" if secret else "no secret: open to all who reach it"
        print(
            f"proxy for {redact(url)} listening on grpc://{host}:{args.port} ({guard}, at most "
            f"{args.db_connections} database connections)",
            file=sys.stderr,
            flush=True,
        )

    serve_proxy(
        storage,
        args.host,
        args.port,
        ready=ready,
        secret=secret,
        threads=args.db_connections,
        log=lambda line: _warn(f"proxy: {line}"),
    )
    return 0
