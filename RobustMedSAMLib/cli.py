"""The ``robustmedsam`` command line: one sub-command per module in ``commands/``.

Each command module defines ``add_parser(subparsers)`` (light imports only, so
``--help`` stays fast) and sets ``func`` to a function taking the parsed
arguments and returning an exit code. Library errors become one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import NoReturn

from RobustMedSAMLib import __version__
from RobustMedSAMLib.errors import RobustMedSAMError
from RobustMedSAMLib.formats.atomic import WRITE_ERRNOS

COMMANDS = (
    "segment",
    "corrupt",
    "corruptions",
    "models",
    "fuse",
    "evaluate",
    "finetune",
    "serve",
)


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose refusals are one line, as the library's are: a bad or
    missing option is named with where to read about it, not after a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="robustmedsam",
        description="Segment medical volumes with a fused MedSAM + RobustSAM model.",
    )
    parser.add_argument("--version", action="version", version=f"robustmedsam {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"RobustMedSAMLib.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe fails here, not at exit
        return code
    except BrokenPipeError:
        # the reader stopped early (`robustmedsam models --json | head`): not an error here
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except RobustMedSAMError as error:
        print(f"robustmedsam {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in WRITE_ERRNOS:
            raise
        # e.g. a folder made in a read-only place, a file without read permission
        where = error.filename or "a file"
        print(f"robustmedsam {args.command}: error: {where}: {error.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"robustmedsam {args.command}: cancelled", file=sys.stderr)
        return 130
