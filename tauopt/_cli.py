"""The ``tauopt`` command line. :func:`main` is the only place errors become messages."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from tauopt import __version__
from tauopt.engine._config import ARCHS, DEFAULT_VAL_CAP, PRECISIONS, PRUNE_RULES, TrainConfig
from tauopt.engine._data import DATASETS, default_data_dir, load_dataset
from tauopt.errors import TauoptError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class HelpFormatter(argparse.HelpFormatter):
    """Shows every flag's default, except where the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            not action.option_strings
            or "default" in text
            or action.default in (None, False, argparse.SUPPRESS)
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def _add_train_parser(sub: Any) -> None:
    defaults = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train one network and report its metrics",
        description="Train one variable-time-step network; progress goes to stderr.",
        formatter_class=HelpFormatter,
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
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="root in torchvision's layout (default: $TAUOPT_DATA or ./data)",
    )
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
    from tauopt.engine._train import (  # deferred: torch is slow to import
        resolve_device,
        set_threads,
        train,
    )

    # Every train flag's dest is the TrainConfig field of the same name.
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    device = resolve_device(args.device)  # before minutes of loading or downloading data
    set_threads(args.threads)
    warn_threads(args.threads)
    dataset = load_dataset(config.dataset, args.data_dir or default_data_dir())
    result = train(config, dataset, device=device, progress=True, cuda_graphs=args.cuda_graphs)
    if args.json:
        json.dump(result.to_dict(), sys.stdout)
        sys.stdout.write("\n")
    else:
        taus = ", ".join(f"{t:.4f}" for t in result.taus)
        # --val-size 0 holds nothing out: there is no validation accuracy to print.
        val = f", validation {result.val_accuracy[-1]:.4f}" if result.val_accuracy else ""
        print(f"test accuracy {result.test_accuracy:.4f}{val}")
        print(
            f"{result.active_blocks} active blocks, {result.active_params} parameters, "
            f"taus [{taus}]"
        )
    return 0


def add_precision(p: argparse.ArgumentParser, default: str | None) -> None:
    """``--precision``, for ``train`` and the workers."""
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=default,
        help="operands of the training step's matrix products; bfloat16 keeps float32 weights "
        "and taus and pays where the hardware multiplies bfloat16 natively (docs/benchmarks.md"
        "#bfloat16-products)" + ("" if default else " (default: the study's [trial] precision)"),
    )


def add_threads(p: argparse.ArgumentParser) -> None:
    """``--threads``, for ``train`` and the workers."""
    p.add_argument(
        "--threads",
        type=_threads,
        default=None,
        help="CPU threads (default: every core; where other work shares the machine, fewer "
        "are faster: one each for as many processes as there are cores)",
    )


def _threads(text: str) -> int:
    from tauopt.engine._train import MAX_THREADS

    value = positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"at most {MAX_THREADS}, got {text!r}")
    return value


def warn_threads(threads: int | None) -> None:
    """One line where ``--threads`` asks for more threads than the machine has cores."""
    cores = os.cpu_count() or 1
    if threads is not None and threads > cores:
        print(
            f"tauopt: warning: --threads {threads} is more than this machine's {cores} cores: "
            "each epoch gets slower, not faster (give each process its share of the cores)",
            file=sys.stderr,
            flush=True,
        )


def positive_int(text: str) -> int:
    """A whole number >= 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def dataset_name(text: str) -> str:
    """A dataset's name, or the path of a user's .npz file (argparse type)."""
    if text in DATASETS or text.endswith(".npz"):
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is no dataset: choose one of {', '.join(DATASETS)}, or the path of an .npz "
        "file with x_train, y_train, x_test and y_test"
    )


def _add_data_parser(sub: Any) -> None:
    p = sub.add_parser(
        "data",
        help="download the datasets (if missing) and check them",
        description="Download the datasets into the data root if they are not there, and check "
        "every file. docker compose runs it once, for the dataset of the study's config, "
        "before the workers start.",
        formatter_class=HelpFormatter,
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
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="root in torchvision's layout (default: $TAUOPT_DATA or ./data)",
    )
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


class Parser(argparse.ArgumentParser):
    """Usage mistakes as one line that names the flag and where help is, and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="tauopt",
        description="Hyperparameter studies for networks with learnable time steps.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(sub)
    _add_data_parser(sub)
    from tauopt._study_cli import add_study_commands  # the study commands live beside

    add_study_commands(sub, HelpFormatter)
    return parser


def _reader_left() -> int:
    """`tauopt export | head`: the reader left; nothing to report. Whatever is still buffered
    for stdout goes nowhere, so that the interpreter's last flush cannot fail either."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 usage or input error, 130 interrupted).

    The only place where an exception becomes a message: a :class:`TauoptError` or a database
    failure is one line and exit 2; anything else is a bug, and its traceback is shown.
    """
    try:
        parser = build_parser()  # imports what the commands rely on, checked on import
    except TauoptError as e:
        print(f"tauopt: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
    except BrokenPipeError:
        return _reader_left()
    except TauoptError as e:
        print(f"tauopt {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except MemoryError:
        print(
            f"tauopt {args.command}: error: out of memory; lower --width, --depth or --batch-size",
            file=sys.stderr,
        )
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"tauopt {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        from tauopt.storage import is_storage_error, root_message

        if not is_storage_error(e):
            raise  # a bug: the traceback is what a report needs
        print(f"tauopt {args.command}: error: database: {root_message(e)}", file=sys.stderr)
        return EXIT_ERROR
    return code
