"""``tauopt reproduce``: the papers' experiment grid enqueued as the trials of one study, for
``tauopt worker`` to train and ``tauopt report`` to read."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any

from tauopt._cli_args import (
    add_command,
    add_storage,
    non_negative_int,
    positive_float,
    positive_int,
    program,
    storage_flag,
)
from tauopt.engine import DATASETS
from tauopt.errors import ConfigError
from tauopt.storage import StorageSettings, redact, resolve_url
from tauopt.study import PAPER_DATASETS, PROTOCOLS, enqueue_grid, grid

#: `tauopt reproduce`'s study: not the main job's, so the two never mix.
REPRODUCE_STUDY = "paper"
MAX_SEEDS = 100


def add_reproduce(sub: Any) -> None:
    p = add_command(
        sub,
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
    add_storage(p, study=REPRODUCE_STUDY)
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
        type=positive_int,
        default=None,
        help="epochs per run (default: the protocol's, 200 or 5)",
    )
    p.add_argument(
        "--train-size",
        type=non_negative_int,
        default=None,
        help="training images per run, 0 for all (default: the protocol's, all or 10,000)",
    )
    p.add_argument(
        "--seeds",
        type=positive_int,
        default=1,
        help=f"runs of every setting (at most {MAX_SEEDS}); the authors ran one",
    )
    p.add_argument(
        "--rates",
        type=positive_float,
        nargs="+",
        default=None,
        metavar="LR",
        help="lr-matched: the learning rates at T = 1 (default 0.01 0.03 0.1; T = 6 runs come "
        "with 0.01 only): more rates as a study of their own, reported with the first",
    )
    p.add_argument(
        "--first-seed",
        type=non_negative_int,
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


def _cmd_reproduce(args: argparse.Namespace) -> int:
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
    where = f"{storage_flag(args, redact(url))} --study {shlex.quote(args.study)}"
    print(
        f"study {args.study!r} in {redact(url)}: {what} ({args.protocol} protocol, "
        f"{spec['epochs']} epochs on {spec['train_size'] or 'all'} images); run them with "
        f"`{program()} worker{where}{_carried()}` (as many as you like), then "
        f"`{program()} report{where} --out report`",
        file=sys.stderr,
    )
    return 0


def _carried() -> str:
    """The data root and model folder this shell sets (``$TAUOPT_DATA``, ``$TAUOPT_ARTIFACTS``)
    as flags: a worker started from another shell finds them as this one would."""
    given = (
        ("--data-dir", os.environ.get("TAUOPT_DATA")),
        ("--artifact-dir", os.environ.get("TAUOPT_ARTIFACTS")),
    )
    return "".join(f" {flag} {shlex.quote(value)}" for flag, value in given if value)
