"""What the command families share: argument types (each check written once), the flags that
several commands take, warnings, and how to spell a command for the shell that ran this one."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from tauopt.engine import DATASETS, MAX_THREADS, PRECISIONS
from tauopt.storage import MAX_STUDY_NAME, StorageSettings

_N = TypeVar("_N", int, float)

DEFAULT_STUDY = "tauopt"
#: How a flag's help says where its default comes from.
FROM_CONFIG = "default: the config's, else built-in"
STORAGE_HELP = "database URL (default: $TAUOPT_STORAGE, else sqlite:///./tauopt.db)"
DATA_DIR_HELP = "root in torchvision's layout (default: $TAUOPT_DATA or ./data)"


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


def add_command(sub: Any, name: str, summary: str, description: str | None = None) -> Any:
    """A subcommand's parser on ``sub``, with the help formatter every command uses."""
    return sub.add_parser(
        name, help=summary, description=description or summary, formatter_class=HelpFormatter
    )


def _refuse(text: str, rule: str) -> NoReturn:
    raise argparse.ArgumentTypeError(f"{rule}, got {text!r}")


def _convert(text: str, kind: Callable[[str], _N], noun: str) -> _N:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None


def positive_int(text: str) -> int:
    """A whole number >= 1 (argparse type)."""
    value = _convert(text, int, "a whole number")
    if value < 1:
        _refuse(text, "must be >= 1")
    return value


def non_negative_int(text: str) -> int:
    """A whole number >= 0 (argparse type)."""
    value = _convert(text, int, "a whole number")
    if value < 0:
        _refuse(text, "must be >= 0")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (argparse type)."""
    value = _convert(text, float, "a number")
    if not math.isfinite(value) or value <= 0:
        _refuse(text, "must be a finite number > 0")
    return value


def non_negative_seconds(text: str) -> float:
    """A number of seconds >= 0 (argparse type; NaN is refused)."""
    value = _convert(text, float, "a number of seconds")
    if not value >= 0:
        _refuse(text, "must be >= 0")
    return value


def at_most(parse: Callable[[str], _N], high: _N, rule: str) -> Callable[[str], _N]:
    """``parse``, and refused with ``rule`` above ``high`` (argparse type)."""

    def check(text: str) -> _N:
        value = parse(text)
        if value > high:
            _refuse(text, rule)
        return value

    return check


#: A sampler's seed: numpy's generators take 32 bits.
seed = at_most(non_negative_int, 2**32 - 1, f"must be below 2**32 = {2**32}")
#: More threads than OpenMP allows crash the process.
threads = at_most(positive_int, MAX_THREADS, f"at most {MAX_THREADS}")


def dataset_name(text: str) -> str:
    """A dataset's name, or the path of a user's .npz file (argparse type)."""
    if text in DATASETS or text.endswith(".npz"):
        return text
    raise argparse.ArgumentTypeError(
        f"{text!r} is no dataset: choose one of {', '.join(DATASETS)}, or the path of an .npz "
        "file with x_train, y_train, x_test and y_test"
    )


def study_name(text: str) -> str:
    """A study name the database column holds (argparse type)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("a study name cannot be empty")
    if len(text) > MAX_STUDY_NAME:
        raise argparse.ArgumentTypeError(
            f"a study name has at most {MAX_STUDY_NAME} characters, got {len(text)}"
        )
    return text


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
        type=threads,
        default=None,
        help="CPU threads (default: every core; where other work shares the machine, fewer "
        "are faster: one each for as many processes as there are cores)",
    )


def add_storage(p: argparse.ArgumentParser, study: str = DEFAULT_STUDY) -> None:
    """``--storage`` and ``--study``."""
    p.add_argument("--storage", default=None, help=STORAGE_HELP)
    p.add_argument("--study", type=study_name, default=study, help="study name")


def add_artifacts(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--artifact-dir",
        type=Path,
        default=None,
        help="trained models (default: $TAUOPT_ARTIFACTS, else tauopt-artifacts beside the "
        "SQLite file)",
    )


def add_heartbeat(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--heartbeat-interval",
        type=positive_int,
        default=None,
        help=f"seconds between heartbeats ({FROM_CONFIG} {StorageSettings.heartbeat_interval})",
    )
    p.add_argument(
        "--grace-period",
        type=positive_int,
        default=None,
        help=f"seconds of silence before a trial is failed ({FROM_CONFIG} twice the interval)",
    )


def add_retry(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-retry-seconds",
        type=non_negative_seconds,
        default=300.0,
        help="how long to ride out a database that does not answer (a restart, dropped "
        "connections, a server still starting) before giving up",
    )


def warn(message: str) -> None:
    print(f"tauopt: {message}", file=sys.stderr, flush=True)


def warn_threads(count: int | None) -> None:
    """One line where ``--threads`` asks for more threads than the machine has cores."""
    cores = os.cpu_count() or 1
    if count is not None and count > cores:
        print(
            f"tauopt: warning: --threads {count} is more than this machine's {cores} cores: "
            "each epoch gets slower, not faster (give each process its share of the cores)",
            file=sys.stderr,
            flush=True,
        )


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


def storage_flag(args: argparse.Namespace, shown: str) -> str:
    """``--storage`` as given, or as ``$TAUOPT_STORAGE`` set it (a shell without it would
    look in ./tauopt.db)."""
    given = args.storage is not None or os.environ.get("TAUOPT_STORAGE")
    return f" --storage {shlex.quote(shown)}" if given else ""
