"""``robustmedsam finetune``: train as a TOML config says, JSON progress lines on stdout."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a model (decoder-only, SVD, full) from a TOML config",
        description="Fine-tune as CONFIG (TOML) says into RUN_DIR: config.toml, train.log, "
        "state.pt (for --resume), last/best model checkpoints. One JSON object per line on "
        "stdout (events start, cache, step, val, stopped, done). SIGINT/SIGTERM finish the "
        "current step, save and exit 0.",
    )
    parser.add_argument("config", type=Path, help="training config (.toml)")
    parser.add_argument("--out", required=True, type=Path, help="run folder (new or empty)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument(
        "--stop-after", type=int, metavar="N", help="stop (as on SIGINT) after N steps in all"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from RobustMedSAMLib.training.config import TrainingConfig
    from RobustMedSAMLib.training.runner import RunOptions, train

    config = TrainingConfig.from_toml(args.config)
    train(config, args.out, RunOptions(resume=args.resume, stop_after=args.stop_after))
    return 0
