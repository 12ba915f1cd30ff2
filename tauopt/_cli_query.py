"""The commands that read a study: ``tauopt best`` (its best trials), ``tauopt export`` (every
trial as CSV) and ``tauopt report`` (figures and report.md); ``tauopt reproduce``
(:mod:`tauopt._cli_reproduce`) makes the grid studies that ``report`` reads."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from tauopt._cli_args import (
    DEFAULT_STUDY,
    STORAGE_HELP,
    add_artifacts,
    add_command,
    add_storage,
    study_name,
)
from tauopt.errors import TauoptError
from tauopt.study import (
    BestTrials,
    best_trials,
    export_csv,
    load_study,
    write_grid_report,
    write_report,
)


def add_best(sub: Any) -> None:
    p = add_command(sub, "best", "the Pareto-optimal (or best) trials")
    add_storage(p)
    add_artifacts(p)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(handler=_cmd_best)


def add_export(sub: Any) -> None:
    p = add_command(sub, "export", "all trials as CSV")
    add_storage(p)
    p.add_argument(
        "--output",
        "-o",
        type=Path,
        default=None,
        help="CSV file, gzipped where the name ends in .gz (default: stdout)",
    )
    p.set_defaults(handler=_cmd_export)


def add_report(sub: Any) -> None:
    p = add_command(
        sub,
        "report",
        "figures (PNG) and report.md of a study",
        "Write the study's figures as PNG files and a report.md that answers, from its trials, "
        "which T is best, l1 against the horizon penalty, and whether pruning changes the gap "
        "between validation and test accuracy; also puts the figures on the dashboard. A grid "
        "of `tauopt reproduce` may be reported from several studies at once (a long grid run "
        "in parts) or from exported trials (--trials), without its database.",
    )
    p.add_argument("--storage", default=None, help=STORAGE_HELP)
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--study",
        type=study_name,
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


def print_best(study: str, trials: BestTrials) -> None:
    """The best trials as a table, or why there are none."""
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


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cmd_best(args: argparse.Namespace) -> int:
    trials = best_trials(args.storage, args.study, artifact_dir=args.artifact_dir)
    if args.json:
        json.dump([t.to_dict() for t in trials], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print_best(args.study, trials)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
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


def _cmd_report(args: argparse.Namespace) -> int:
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
