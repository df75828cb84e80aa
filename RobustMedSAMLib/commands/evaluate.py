"""``robustmedsam evaluate``: models x data x protocols x corruptions -> CSV, Markdown, PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

from RobustMedSAMLib.commands._progress import meet_all_ranks, progress_bar
from RobustMedSAMLib.names import ENGINES, PROJECTIONS, PROTOCOLS
from RobustMedSAMLib.names import FIRST_PROMPTS as PROMPTS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate models on data sets, clean and corrupted; write CSV, summary and plots",
        description="Run the evaluation matrix (models x cases x clean and corrupted images x "
        "protocols) and write OUT/results.csv (one row per number; resumable: finished cells "
        "are skipped on a re-run), OUT/summary.md and PNG plots. A model whose checkpoint is "
        "missing is reported as missing, not skipped.",
        epilog="examples: --model sam --model medsam --model fused:fused.pth "
        "--model fused_ft=fused:runs/ft/best.pth --data npz:data/kvasir_256.npz,modality=endoscopy "
        "--data pairs:data/kits,modality=CT --data phantom:all,count=2",
    )
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="SPEC",
        help="[LABEL=]NAME[:CHECKPOINT] or [LABEL=]fused:ENCODER+DECODER; NAME: robustmedsam-lite, "
        "litemedsam, sam, "
        "medsam, robustsam, medicosam, fused (repeat to compare; required unless "
        "--report-only)",
    )
    parser.add_argument("--checkpoint", type=Path, help="checkpoint for a single --model NAME")
    parser.add_argument(
        "--data",
        action="append",
        metavar="SPEC",
        help="npz:FILE | pairs:FOLDER | phantom:SHAPE, then ,key=value options "
        "(split, limit, modality, name, labels, count, size); repeat for several "
        "(required unless --report-only)",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    protocol = parser.add_argument_group("protocols")
    protocol.add_argument("--protocol", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    protocol.add_argument("--prompt", nargs="+", choices=PROMPTS, default=list(PROMPTS))
    protocol.add_argument(
        "--projection",
        nargs="+",
        choices=(*PROJECTIONS, "all"),
        default=["all"],
        metavar="MODE",
        help=f"3D propagation modes: {', '.join(PROJECTIONS)} or all (default)",
    )
    protocol.add_argument(
        "--clicks", type=int, default=7, help="correction clicks after the first prompt"
    )
    conditions = parser.add_argument_group("image conditions")
    conditions.add_argument(
        "--corruptions",
        nargs="+",
        default=["all"],
        metavar="NAME",
        help="clean and/or corruption names, or all (default; clean + the 12 types)",
    )
    conditions.add_argument(
        "--severities", nargs="+", type=int, default=[1, 2, 3, 4, 5], metavar="S"
    )
    conditions.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="N")
    protocol.add_argument(
        "--prompt-jitter",
        type=float,
        default=0.0,
        metavar="F",
        help="0 (default): the exact first prompt; above 0 each seed draws a user-like one: "
        "box sides moved by up to F x the box's size, a random point of the object's core "
        "(clean and deterministic corruptions then run with every seed too)",
    )
    parser.add_argument(
        "--encoder-cache",
        type=Path,
        metavar="DIR",
        help="keep image-encoder outputs in DIR and reuse them across runs and across models "
        "with the same encoder (e.g. litemedsam and robustmedsam-lite); float32, "
        "about 7 MB per slice for the lite models",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="eager",
        help="runtime of the lite models' image encoder on the CPU (ViT models run eager); "
        "onnx and openvino need pip install 'robustmedsam[cpu-engines]'",
    )
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda|mps (default: auto)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="processes on this machine, each taking every N-th case (GPU k mod count); "
        "under torchrun, per rank, and the cases are split over all ranks' processes",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only rewrite summary and plots from OUT's CSV (no --model or --data needed)",
    )
    parser.set_defaults(func=run)


def _model_specs(args: argparse.Namespace) -> list:
    from dataclasses import replace

    from RobustMedSAMLib.errors import InputError
    from RobustMedSAMLib.evaluation.models import parse_model_spec

    specs = [parse_model_spec(text) for text in args.models]
    if args.checkpoint is not None:
        if len(specs) != 1 or specs[0].checkpoint or specs[0].encoder:
            raise InputError(
                "--checkpoint goes with a single --model NAME; for several models write "
                "--model NAME:CHECKPOINT"
            )
        specs = [replace(specs[0], checkpoint=args.checkpoint)]
    return specs


def _check_inputs(args: argparse.Namespace) -> None:
    """An evaluation needs models and data (InputError naming the first one missing)."""
    from RobustMedSAMLib.errors import InputError

    for flag, given in (("--model", args.models), ("--data", args.data)):
        if not given:
            raise InputError(f"give {flag} SPEC (or --report-only to rewrite the report)")


def _options(args: argparse.Namespace):
    from RobustMedSAMLib.corruptions import CORRUPTIONS
    from RobustMedSAMLib.evaluation.matrix import CLEAN, MatrixOptions

    corruptions = args.corruptions
    if "all" in corruptions:
        corruptions = [CLEAN, *CORRUPTIONS]
    projections = PROJECTIONS if "all" in args.projection else args.projection
    return MatrixOptions(
        protocols=tuple(args.protocol),
        prompts=tuple(args.prompt),
        projections=tuple(projections),
        n_corrections=args.clicks,
        corruptions=tuple(dict.fromkeys(corruptions)),
        severities=tuple(dict.fromkeys(args.severities)),
        seeds=tuple(dict.fromkeys(args.seeds)),
        prompt_jitter=args.prompt_jitter,
    )


def run(args: argparse.Namespace) -> int:
    import sys

    from RobustMedSAMLib import distributed
    from RobustMedSAMLib.errors import InputError
    from RobustMedSAMLib.evaluation.datasets import load_cases
    from RobustMedSAMLib.evaluation.report import write_report
    from RobustMedSAMLib.evaluation.results_csv import CSV_NAME
    from RobustMedSAMLib.evaluation.shards import merge_parts

    if args.report_only:
        merge_parts(args.out)
        if not (args.out / CSV_NAME).is_file():
            raise InputError(f"no {CSV_NAME} in {args.out}: run the evaluation first")
    else:
        _check_inputs(args)
        options = _options(args)
        options.validate()
        specs = _model_specs(args)
        cases = [case for spec in args.data for case in load_cases(spec)]
        _prepare_out(args.out)
        info = distributed.dist_info()
        result = _run_with_progress(specs, cases, args, options, info)
        where = f"rank {info.rank} of {info.world}: " if info.distributed else ""
        print(
            f"{where}{result.computed} cells computed, {result.skipped} already done, "
            f"{result.failed} failed -> {result.csv_path}"
        )
        if not info.distributed:
            _write_timings(args.out, result.times)
        for label in result.missing:
            print(f"model {label}: not loaded, no results (the summary says why)", file=sys.stderr)
        later = "robustmedsam evaluate ... --report-only"
        if info.distributed and not (meet_all_ranks(info, later) and info.main):
            return 0  # rank 0 merges and reports for all
        merge_parts(args.out)
    files = write_report(args.out)
    print(f"summary: {files.summary}")
    for plot in files.plots:
        print(f"plot: {plot}")
    return 0


def _prepare_out(out: Path) -> None:
    """Make the output folder (InputError when ``out`` is a file or cannot take files)."""
    from RobustMedSAMLib.errors import InputError
    from RobustMedSAMLib.formats.atomic import check_writable, make_folder

    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: give a folder (it is created if absent)")
    check_writable(make_folder(out))


def _run_with_progress(specs, cases, args: argparse.Namespace, options, info):
    from RobustMedSAMLib.evaluation.parallel import run_parallel

    quiet = args.no_progress
    unit = "cell" if args.workers == 1 and not info.distributed else "worker"
    with progress_bar("evaluate", unit, disable=quiet) as progress:
        return run_parallel(
            specs, cases, args.out, options, args.device, args.workers, info, progress,
            args.encoder_cache, args.engine,
        )  # fmt: skip


def _write_timings(out: Path, times: dict) -> None:
    """Per-model encoder / decoder call counts and seconds of this run (timings.json)."""

    from RobustMedSAMLib.formats.atomic import write_json

    if not times:
        return
    record = {label: t.to_dict() for label, t in times.items()}
    write_json(out / "timings.json", record)
    for label, t in record.items():
        per = [t[f"{part}_seconds_per_call"] for part in ("encoder", "decoder")]
        text = ", ".join(
            f"{part} {t[f'{part}_calls']} calls" + (f" at {s:.4f} s" if s is not None else "")
            for part, s in zip(("encoder", "decoder"), per, strict=True)
        )
        print(f"timings {label}: {text}")
