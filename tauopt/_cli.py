"""The ``tauopt`` command line: the parser, assembled from one module per command family, and
:func:`main`, the only place where an exception becomes a message and an exit code.

The families: ``_cli_train`` (train, data), ``_cli_study`` (create, worker), ``_cli_run`` (run:
create and one worker, the main job), ``_cli_query`` (best, export, report),
``_cli_reproduce`` (reproduce: the papers' grid) and ``_cli_serve`` (proxy, dashboard); what
they share (argument types, common flags) is in ``_cli_args``. They import one way: no
command module imports this one.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from tauopt import __version__
from tauopt.errors import TauoptError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """Usage mistakes as one line that names the flag and where help is, and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand, in the order ``tauopt --help`` lists them. The command modules are
    imported here, inside :func:`main`'s reach: a library they load that is not a supported
    version raises on import (:class:`~tauopt.errors.DependencyError`)."""
    from tauopt._cli_args import HelpFormatter
    from tauopt._cli_query import add_best, add_export, add_report
    from tauopt._cli_reproduce import add_reproduce
    from tauopt._cli_run import add_run
    from tauopt._cli_serve import add_dashboard, add_proxy
    from tauopt._cli_study import add_create, add_worker
    from tauopt._cli_train import add_data, add_train

    parser = Parser(
        prog="tauopt",
        description="Hyperparameter studies for networks with learnable time steps.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        add_train,
        add_data,
        add_create,
        add_worker,
        add_run,
        add_best,
        add_export,
        add_reproduce,
        add_report,
        add_proxy,
        add_dashboard,
    ):
        add(sub)
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
