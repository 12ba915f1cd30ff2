"""``tauopt train`` (one network, its metrics) and ``tauopt data`` (the datasets, fetched and
checked)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from tauopt._cli_args import (
    DATA_DIR_HELP,
    add_command,
    add_precision,
    add_threads,
    dataset_name,
    warn_threads,
)
from tauopt.engine import (
    ARCHS,
    DATASETS,
    DEFAULT_VAL_CAP,
    PRUNE_RULES,
    TrainConfig,
    default_data_dir,
    load_dataset,
    resolve_device,
    result_data,
    set_threads,
    train,
)


def add_train(sub: Any) -> None:
    """``tauopt train``: every flag's dest is the :class:`TrainConfig` field of its name."""
    defaults = TrainConfig()
    p = add_command(
        sub,
        "train",
        "train one network and report its metrics",
        "Train one variable-time-step network; progress goes to stderr.",
    )
    p.add_argument("--arch", choices=ARCHS, default=defaults.arch, help="network")
    p.add_argument(
        "--dataset",
        type=dataset_name,
        default=defaults.dataset,
        help=f"{', '.join(DATASETS)}, or the path of an .npz file with x_train, y_train, "
        "x_test and y_test",
    )
    p.add_argument(
        "--normalize",
        action="store_true",
        help="standardise every input feature by the training split's mean and std (stored "
        "with the model)",
    )
    p.add_argument("--data-dir", type=Path, default=None, help=DATA_DIR_HELP)
    p.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the data")
    p.add_argument(
        "--T",
        dest="T",
        type=float,
        default=defaults.T,
        help="time horizon; every tau starts at T/depth",
    )
    p.add_argument(
        "--l1", type=float, default=defaults.l1, help="weight of the l1 penalty sum|tau|"
    )
    p.add_argument(
        "--horizon-weight",
        type=float,
        default=defaults.horizon_weight,
        help="weight of (sum(tau) - T)^2",
    )
    p.add_argument(
        "--dependent-last-tau",
        action="store_true",
        help="the last tau is T - sum(other taus) in the forward pass (gradients see it)",
    )
    p.add_argument(
        "--projected-last-tau",
        action="store_true",
        help="the last tau is overwritten with T - sum(other taus) after each step, with no "
        "gradient through it (the papers' code)",
    )
    p.add_argument(
        "--prune-eps",
        type=float,
        default=None,
        help="remove ResNet blocks with |tau_l|/sum|tau| below this (default: no pruning)",
    )
    p.add_argument(
        "--prune-every", type=int, default=defaults.prune_every, help="check pruning every N epochs"
    )
    p.add_argument(
        "--prune-rule",
        choices=PRUNE_RULES,
        default=defaults.prune_rule,
        help="all: every block under --prune-eps goes; smallest: only the smallest one per check "
        "(the papers' code)",
    )
    p.add_argument("--gamma", type=float, default=defaults.gamma, help="fractional order (fracdnn)")
    p.add_argument(
        "--tau-min", type=float, default=defaults.tau_min, help="lower bound of the taus (fracdnn)"
    )
    p.add_argument(
        "--detach-memory",
        action="store_true",
        help="no gradient through the memory coefficients (fracdnn)",
    )
    p.add_argument("--width", type=int, default=defaults.width, help="neurons per block")
    p.add_argument("--depth", type=int, default=defaults.depth, help="tau-blocks")
    p.add_argument("--lr", type=float, default=defaults.lr, help="SGD learning rate")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per step")
    p.add_argument("--seed", type=int, default=defaults.seed, help="weights and data order")
    p.add_argument(
        "--data-seed",
        type=int,
        default=None,
        help="order of the training batches, if other than --seed's (a study's trials use 0)",
    )
    p.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help="draw of the validation images and of --train-size's subset (default: one fixed "
        "draw that every run and trial shares)",
    )
    p.add_argument("--fixed-tau", action="store_true", help="do not train the taus (the baseline)")
    p.add_argument(
        "--fixed-input-tau",
        action="store_true",
        help="train every tau but the input block's: the papers' code's 'fixed' ResNet",
    )
    p.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="train on the first N images of the training split (default: all that the "
        "validation images leave, 50,000 of MNIST's 60,000)",
    )
    p.add_argument(
        "--val-size",
        type=int,
        default=None,
        help="validation images held out of the training split (default: a fifth of it, at "
        f"most {DEFAULT_VAL_CAP:,}; 0: none)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    add_threads(p)
    add_precision(p, defaults.precision)
    p.add_argument(
        "--no-cuda-graphs",
        dest="cuda_graphs",
        action="store_false",
        help="on a GPU, launch every kernel of the step instead of replaying a CUDA graph",
    )
    p.add_argument(
        "--json", action="store_true", help="print one JSON object with every metric to stdout"
    )
    p.set_defaults(handler=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    # Every train flag's dest is the TrainConfig field of the same name.
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    device = resolve_device(args.device)  # before minutes of loading or downloading data
    set_threads(args.threads)
    warn_threads(args.threads)
    dataset = load_dataset(config.dataset, args.data_dir or default_data_dir())
    result = train(config, dataset, device=device, progress=True, cuda_graphs=args.cuda_graphs)
    if args.json:
        json.dump(result_data(result), sys.stdout)
        sys.stdout.write("\n")
    else:
        taus = ", ".join(f"{t:.4f}" for t in result.taus)
        # --val-size 0 holds nothing out: there is no validation accuracy to print.
        val = f", validation {result.final_val_accuracy:.4f}" if result.history.val_accuracy else ""
        print(f"test accuracy {result.test_accuracy:.4f}{val}")
        print(
            f"{result.active_blocks} active blocks, {result.active_params} parameters, "
            f"taus [{taus}]"
        )
    return 0


def add_data(sub: Any) -> None:
    """``tauopt data``."""
    p = add_command(
        sub,
        "data",
        "download the datasets (if missing) and check them",
        "Download the datasets into the data root if they are not there, and check every file. "
        "docker compose runs it once, for the dataset of the study's config, before the "
        "workers start.",
    )
    p.add_argument(
        "--dataset",
        type=dataset_name,
        nargs="+",
        default=None,
        help=f"which ({', '.join(DATASETS)}, or an .npz file; default: the --config's, else "
        "mnist and fashion-mnist)",
    )
    p.add_argument("--config", type=Path, default=None, help="the dataset of this study config")
    p.add_argument("--data-dir", type=Path, default=None, help=DATA_DIR_HELP)
    p.set_defaults(handler=_cmd_data)


def _cmd_data(args: argparse.Namespace) -> int:
    root = args.data_dir or default_data_dir()
    names = args.dataset
    if names is None and args.config is not None:
        from tauopt.study import load_config

        names = [load_config(args.config).trial.dataset]
    for name in names or ["mnist", "fashion-mnist"]:
        data = load_dataset(name, root)
        shape = " x ".join(str(d) for d in data.shape)
        print(
            f"{name}: {len(data.train):,} training and {len(data.test):,} test images of "
            f"{shape}, {data.num_classes} classes",
            file=sys.stderr,
        )
    return 0
