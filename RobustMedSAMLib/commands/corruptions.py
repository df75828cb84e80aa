"""``robustmedsam corruptions``: list the corruption types and their severities."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "corruptions",
        help="list the corruption types and their parameter at each severity",
        description="List the corruption types that `robustmedsam corrupt` applies, "
        "with their parameter at severities 1 (barely visible) to 5 (heavy).",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from RobustMedSAMLib.corruptions import corruption_table

    print(corruption_table())
    return 0
