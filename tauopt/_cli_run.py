"""``tauopt run``, the main job: create (or resume) a study, run one worker here, then print the
best trials and the exact commands for what comes next."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any

from tauopt._cli_args import (
    DEFAULT_STUDY,
    add_command,
    add_storage,
    program,
    storage_flag,
)
from tauopt._cli_query import print_best
from tauopt._cli_study import (
    add_create_flags,
    add_worker_flags,
    create,
    report_stop,
    run_worker,
    storage_settings,
    study_config,
)
from tauopt.engine import RawDataset, load_dataset
from tauopt.storage import default_artifact_dir, redact, resolve_url
from tauopt.study import StudyConfig, best_trials, check_change, settle, study_dataset

#: The settings of ``tauopt run`` that a command printed for what comes next carries over:
#: (flag, dest). Without them the printed command would describe another study (and be
#: refused), or look for the data elsewhere.
_RUN_SETTINGS = (
    ("--config", "config"),
    ("--dataset", "dataset"),
    ("--epochs", "epochs"),
    ("--train-size", "train_size"),
    ("--val-size", "val_size"),
    ("--normalize", "normalize"),
    ("--objective", "objective"),
    ("--heartbeat-interval", "heartbeat_interval"),
    ("--grace-period", "grace_period"),
    ("--device", "device"),
    ("--threads", "threads"),
    ("--precision", "precision"),
)


def add_run(sub: Any) -> None:
    p = add_command(
        sub,
        "run",
        "create a study and run one local worker (the main job)",
        "Create (or resume) a study and run one worker here until the budget is spent; then "
        "print the Pareto-optimal trials and how to look at them.",
    )
    add_storage(p)
    add_create_flags(p)
    add_worker_flags(p)
    p.set_defaults(handler=_cmd_run)


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
    words = [_word(flag, values[dest]) for flag, dest in flags if values[dest] is not None]
    if args.quiet:
        words.append("--quiet")
    return " ".join([f"{program()} run{storage_flag(args, shown)}", *words])


def _word(flag: str, value: object) -> str:
    """``--flag value``; a switch (``--normalize``: True where given) alone."""
    return flag if value is True else f"{flag} {shlex.quote(str(value))}"


def _load_data(args: argparse.Namespace, config: StudyConfig) -> RawDataset:
    """The study's data, read (a named dataset downloaded where missing) before anything is
    changed: a run that cannot find its data leaves the study as it was."""
    own = study_dataset(config, args.data_dir)  # a user's file: read and checked
    # What create would refuse, refused first: the data of a study this run does not match
    # may not even be here.
    check_change(storage_settings(args, config), args.study, settle(config, own))
    return own if own is not None else load_dataset(config.trial.dataset, args.data_dir)


def _cmd_run(args: argparse.Namespace) -> int:
    config = study_config(args)
    dataset = _load_data(args, config)
    config = create(args, config, dataset)
    summary = run_worker(args, dataset)
    if report_stop(args, summary):
        return 0
    url = resolve_url(args.storage)
    shown = redact(url)  # the exact commands for what comes next; never a password
    tauopt = program()
    flag = storage_flag(args, shown)
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
    print_best(args.study, trials)
    artifact_flag = f" --artifact-dir {shlex.quote(str(artifacts))}"
    print(f"\ntrained models: {artifacts}")
    print(f"dashboard:      {tauopt} dashboard{flag}{artifact_flag}")
    print("                then open http://127.0.0.1:8080/dashboard")
    print(f"table again:    {tauopt} best{flag}{study_flag}")
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
