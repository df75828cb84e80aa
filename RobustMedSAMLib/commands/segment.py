"""``robustmedsam segment``: a volume + Slicer markups prompts -> a segmentation file;
or, with ``--cases``, many of them over worker processes and torchrun ranks."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from RobustMedSAMLib.commands._progress import meet_all_ranks, progress_bar
from RobustMedSAMLib.names import (
    AXIS_NAMES,
    DEFAULT_LIKENESS,
    DEFAULT_MODEL,
    DEFAULT_STABILITY,
    ENGINES,
    MODEL_NAMES,
    PROJECTIONS,
    SEED_BOX_GROWTH,
)

BATCH_HELP = (
    "batch: --cases is a CSV (header: volume,points,negative,box,out; paths relative to the "
    "CSV; out defaults to VOLUME-NAME.seg.nrrd) or a folder holding VOLUME + "
    "VOLUME_points.mrk.json / VOLUME_negative.mrk.json / VOLUME_box.mrk.json. Each case "
    "writes OUT-DIR/OUT and OUT.json (atomically; a re-run skips finished cases) or "
    "OUT.error.json; OUT-DIR/batch_summary.json lists done, failed and pending cases. "
    "Under torchrun each rank takes cases i with i % WORLD_SIZE == RANK. Exit code 1 "
    "if a case failed."
)


def add_model_arguments(
    parser: argparse.ArgumentParser, default: str | None, model_help: str
) -> argparse._ArgumentGroup:
    """The model group that ``segment`` and ``serve`` share; returns it for more options."""
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=default, choices=MODEL_NAMES, help=model_help)
    model.add_argument("--checkpoint", type=Path, help="checkpoint file (overrides the registry)")
    model.add_argument("--encoder", type=Path, help="fused: MedSAM checkpoint for the encoder")
    model.add_argument("--decoder", type=Path, help="fused: RobustSAM checkpoint for the decoder")
    model.add_argument("--device", default="auto", help="auto|cpu|cuda|mps (default: auto)")
    model.add_argument("--half", action="store_true", help="CUDA: bf16/fp16 image encoder")
    model.add_argument("--fast-cpu", action="store_true", help="CPU: int8 image encoder")
    model.add_argument(
        "--engine",
        default="eager",
        choices=ENGINES,
        help="CPU, lite models: run the image encoder and mask decoder under ONNX Runtime "
        "or OpenVINO (optional packages: pip install 'robustmedsam[cpu-engines]'); "
        "default: eager",
    )
    return model


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment a volume from Slicer markups prompts (one slice, or 3D with --propagate)",
        description="Segment VOLUME (NRRD, NIfTI, MHA or a DICOM folder) from Slicer markups "
        "files (.mrk.json, LPS or RAS). Writes OUT (.seg.nrrd: a Slicer segmentation; "
        ".nii.gz: a label map) and OUT.json, a record of the run.",
        epilog=BATCH_HELP,
    )
    parser.add_argument("volume", type=Path, nargs="?", help="volume file or DICOM series folder")
    parser.add_argument("--out", type=Path, help="output .seg.nrrd or .nii.gz")
    prompts = parser.add_argument_group("prompts (Slicer markups JSON)")
    prompts.add_argument("--points", type=Path, help="include points (point list)")
    prompts.add_argument("--negative", type=Path, help="exclude points (point list)")
    prompts.add_argument("--box", type=Path, help="box (ROI)")
    prompts.add_argument(
        "--replay",
        type=Path,
        metavar="RECORD.json",
        help="the prompts (RAS) of an earlier run's record, e.g. on another volume or model",
    )
    add_model_arguments(
        parser, None, f"default: {DEFAULT_MODEL} (with --server: the server's model)"
    )
    run_group = parser.add_argument_group("slicing and propagation")
    run_group.add_argument("--axis", default="axial", choices=AXIS_NAMES)
    run_group.add_argument("--propagate", action="store_true", help="propagate into 3D")
    zoom = run_group.add_mutually_exclusive_group()
    zoom.add_argument(
        "--zoom",
        action="store_const",
        const=True,
        default="auto",
        help="with --box: always segment on a crop around the box (default: only when the "
        "box is under 32 px at the model's input, e.g. a lung nodule)",
    )
    zoom.add_argument(
        "--no-zoom", dest="zoom", action="store_const", const=False, help="never zoom"
    )
    run_group.add_argument(
        "--projection",
        default="mask",
        choices=PROJECTIONS,
        help="prompt derived for the next slice (default: mask)",
    )
    run_group.add_argument(
        "--iou-threshold",
        type=float,
        default=0.5,
        help="stop a direction when the overlap with the previous slice is under it "
        "(0..1, default 0.5)",
    )
    run_group.add_argument("--min-score", type=float, default=0.0, help="stop on predicted IoU")
    run_group.add_argument(
        "--min-likeness",
        type=float,
        default=DEFAULT_LIKENESS,
        help="stop a direction when the mask holds what surrounded the seed rather than what "
        f"the seed held (0..1; 0: off; default {DEFAULT_LIKENESS})",
    )
    run_group.add_argument(
        "--min-stability",
        type=float,
        default=DEFAULT_STABILITY,
        help="stop a direction when the model's stability score is under it (0..1; 0: off; "
        f"default {DEFAULT_STABILITY})",
    )
    run_group.add_argument(
        "--box-growth",
        default=str(SEED_BOX_GROWTH),
        metavar="F",
        help="move each side of a box drawn on one slice (a flat ROI) out by F x its width / "
        "height before the model is first asked (a box drawn tight to the edge, or inside "
        f"it; 0: off; default {SEED_BOX_GROWTH}); a 3D ROI and a point prompt are not grown",
    )
    run_group.add_argument(
        "--refine-steps",
        type=int,
        metavar="N",
        help="ask each propagated slice again with its own mask's box up to N times "
        "(thick slices, a lesion that moves between them; default 0)",
    )
    run_group.add_argument("--bounds", type=int, nargs=2, metavar=("FIRST", "LAST"))
    run_group.add_argument(
        "--slice-step",
        default="1",
        metavar="N",
        help="propagate asking the model on every N-th slice and fill the slices between "
        "from the masks on either side (thin slices; default 1: every slice)",
    )
    run_group.add_argument(
        "--encode-ahead",
        type=int,
        default=2,
        metavar="N",
        help="encode N slices on a worker thread ahead of the one being segmented, in "
        "propagation order (0: off; default 2)",
    )
    run_group.add_argument(
        "--window",
        nargs="+",
        metavar="PRESET|LO,HI",
        help="intensity window: soft_tissue (40/400 HU), lung, bone, brain, mr (0.5..99.5 "
        "percentiles), auto (default: soft_tissue for CT, mr otherwise) or LO,HI "
        "(also LO HI; write --window=-160,240 when LO is negative)",
    )
    run_group.add_argument("--segment-name", default="Segment_1")
    run_group.add_argument("--cache-dir", type=Path, help="disk cache for slice embeddings")
    remote = parser.add_argument_group("inference server (docs/server.md)")
    remote.add_argument("--server", metavar="URL", help="run the model work on this server")
    remote.add_argument(
        "--token-file", type=Path, help="the server's token (default: $ROBUSTMEDSAM_TOKEN)"
    )
    batch = parser.add_argument_group("batch (many cases; see below)")
    batch.add_argument("--cases", type=Path, help="case list: a CSV file or a folder")
    batch.add_argument("--out-dir", type=Path, help="output folder for --cases (created)")
    batch.add_argument(
        "--workers", type=int, default=1, help="processes on this machine (default: 1)"
    )
    batch.add_argument(
        "--status", action="store_true", help="only write batch_summary.json; run nothing"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from RobustMedSAMLib.errors import InputError

    if args.cases is not None:
        if args.volume is not None or args.out is not None:
            raise InputError("give either VOLUME --out OUT or --cases LIST --out-dir DIR")
        return _run_batch(args)
    if args.volume is None or args.out is None:
        raise InputError("give VOLUME and --out OUT (or --cases LIST --out-dir DIR)")
    return _run_single(args)


def _check_server_flags(args: argparse.Namespace) -> None:
    """With --server the server's model and device are used: refuse local model flags."""
    from RobustMedSAMLib.errors import InputError

    if args.server is None:
        if args.token_file is not None:
            raise InputError("--token-file goes with --server URL")
        return
    local = {"--checkpoint": args.checkpoint, "--encoder": args.encoder,
             "--decoder": args.decoder, "--half": args.half, "--fast-cpu": args.fast_cpu,
             "--cache-dir": args.cache_dir, "--device": args.device != "auto",
             "--engine": args.engine != "eager"}  # fmt: skip
    given = [flag for flag, value in local.items() if value]
    if given:
        raise InputError(f"with --server the server's model and device are used: drop {given[0]}")


def settings_from_args(args: argparse.Namespace):
    """The SegmentSettings of the model, slicing and propagation flags."""
    from RobustMedSAMLib.errors import InputError
    from RobustMedSAMLib.formats.segmentation import check_segment_name
    from RobustMedSAMLib.inference.batch import SegmentSettings

    _check_server_flags(args)
    if args.half:  # (refused with --server above: the client imports no torch)
        from RobustMedSAMLib.device import check_half

        check_half(args.device, args.half)  # before a batch makes its folder
    if not args.segment_name.strip():
        raise InputError("--segment-name is empty: give the segment a name")
    check_segment_name(args.segment_name)
    return SegmentSettings(
        model=args.model if args.model or args.server else DEFAULT_MODEL,
        checkpoint=args.checkpoint,
        encoder=args.encoder,
        decoder=args.decoder,
        device=args.device,
        half=args.half,
        fast_cpu=args.fast_cpu,
        engine=args.engine,
        axis=args.axis,
        propagate=args.propagate,
        zoom=args.zoom,
        projection=args.projection,
        iou_threshold=args.iou_threshold,
        min_score=args.min_score,
        min_likeness=args.min_likeness,
        min_stability=args.min_stability,
        seed_box_growth=box_growth_arg(args.box_growth),
        refine_steps=args.refine_steps,
        bounds=tuple(args.bounds) if args.bounds else None,
        slice_step=slice_step_arg(args.slice_step),
        encode_ahead=args.encode_ahead,
        window=window_arg(args.window),
        segment_name=args.segment_name,
        cache_dir=args.cache_dir,
        server=args.server,
        token_file=args.token_file,
    )


def box_growth_arg(text: str) -> float:
    """``--box-growth`` text -> a fraction >= 0 (InputError naming the flag otherwise).
    Parsed here rather than by argparse, whose refusal is a usage block, not one line."""
    from RobustMedSAMLib.errors import InputError

    try:
        growth = float(text)
    except ValueError:
        growth = math.nan
    if not (math.isfinite(growth) and growth >= 0):
        raise InputError(f"--box-growth {text}: give a fraction of the box, 0 or more (0: off)")
    return growth


def window_arg(values: list[str] | None):
    """``--window`` tokens -> a preset name or ``(low, high)`` (InputError when unusable)."""
    from RobustMedSAMLib.errors import InputError
    from RobustMedSAMLib.inference.preprocessing import parse_window

    if not values:
        return None
    if len(values) > 2:
        raise InputError(f"--window {' '.join(values)}: give one PRESET, LO,HI or LO HI")
    return parse_window(values[0] if len(values) == 1 else values)


def slice_step_arg(value: str) -> int:
    """``--slice-step`` -> a whole number >= 1 (InputError otherwise)."""
    from RobustMedSAMLib.errors import InputError

    try:
        step = int(value)
    except ValueError:
        step = 0
    if step < 1:
        raise InputError(f"--slice-step {value}: give a whole number of slices, 1 or more")
    return step


def _check_needs_propagate(args: argparse.Namespace) -> None:
    """Flags that only shape propagation are refused without ``--propagate`` (they would
    be ignored, and the user would get one slice where they asked for a range)."""
    from RobustMedSAMLib.errors import InputError

    if args.propagate:
        return
    if args.bounds:
        raise InputError("--bounds limits propagation: add --propagate (or drop --bounds)")
    if slice_step_arg(args.slice_step) > 1:
        raise InputError("--slice-step applies to propagation: add --propagate")


def _check_inputs_kept(args: argparse.Namespace) -> None:
    """Refuse an ``--out`` (or its record ``OUT.json``) that is one of the input files."""
    from RobustMedSAMLib.formats.atomic import check_not_an_input

    outputs = (args.out, args.out.with_name(args.out.name + ".json"))
    check_not_an_input(outputs, {"the input volume": args.volume,
                                 "the --points file": args.points,
                                 "the --negative file": args.negative,
                                 "the --box file": args.box,
                                 "the --replay record": args.replay})  # fmt: skip


def _run_single(args: argparse.Namespace) -> int:
    from RobustMedSAMLib.errors import InputError
    from RobustMedSAMLib.formats.segmentation import check_segmentation_output
    from RobustMedSAMLib.formats.volume import read_volume
    from RobustMedSAMLib.inference.batch import make_segmenter, read_prompts
    from RobustMedSAMLib.inference.slicing import axis_index, check_slice_size

    if args.replay and (args.points or args.negative or args.box):
        raise InputError("give either --replay or --points/--negative/--box, not both")
    if not (args.points or args.box or args.replay):
        raise InputError("no prompt: give --points and/or --box (Slicer markups files)")
    _check_needs_propagate(args)
    check_segmentation_output(args.out)  # a wrong name or place: refused before the work
    _check_inputs_kept(args)
    volume = read_volume(args.volume)
    check_slice_size(volume, axis_index(volume, args.axis))  # before the model loads
    if args.replay:
        from RobustMedSAMLib.inference.segment_volume import read_record_prompts

        prompts = read_record_prompts(args.replay)
    else:
        prompts = read_prompts(args.points, args.negative, args.box)
    settings = settings_from_args(args)
    settings.options()
    segmenter = make_segmenter(settings)
    with progress_bar("propagating", "slice", disable=not args.propagate) as progress:
        result, record, _ = segmenter.segment(volume, prompts, args.volume, progress)
    segmenter.write(args.out, result, volume, record)
    encoded = record["timings"]["encoder_calls"]
    print(
        f"wrote {args.out}: {int(result.mask.sum())} voxels on {len(result.slices)} slices "
        f"in {result.seconds:.1f} s ({encoded} slices encoded)"
    )
    return 0


def _run_batch(args: argparse.Namespace) -> int:
    import sys

    from RobustMedSAMLib import distributed
    from RobustMedSAMLib.errors import InputError
    from RobustMedSAMLib.formats.atomic import check_writable, make_folder
    from RobustMedSAMLib.inference.batch import (
        check_inputs_kept,
        read_cases,
        run_batch,
        write_status,
    )

    if args.out_dir is None:
        raise InputError("--cases needs --out-dir DIR")
    if args.workers < 1:
        raise InputError(f"--workers {args.workers}: give 1 or more processes")
    if args.points or args.negative or args.box:
        raise InputError("with --cases, prompts come from the case list, not --points/--box")
    if not args.status:  # --status only reports: the run's own flags may come along
        _check_needs_propagate(args)
        settings = settings_from_args(args)  # refusals before the output folder is made
    cases = read_cases(args.cases)
    check_inputs_kept(cases, args.out_dir)
    check_writable(make_folder(args.out_dir))
    if args.status:
        return _print_status(write_status(args.out_dir, cases), args.out_dir)
    info = distributed.dist_info()
    with progress_bar("cases", "case") as progress:
        summary = run_batch(cases, args.out_dir, settings, args.workers, info, progress)
    print(summary.line())
    for outcome in summary.failed:
        print(f"failed {outcome.case}: {outcome.error}", file=sys.stderr)
    if info.distributed:
        if not meet_all_ranks(info, "robustmedsam segment --cases ... --out-dir ... --status"):
            return 1 if summary.failed else 0
        if not info.main:
            return 0  # rank 0 reports for all; a non-zero exit would stop the job early
    return _print_status(write_status(args.out_dir, cases), args.out_dir)


def _print_status(status: dict, out_dir: Path) -> int:
    print(
        f"{len(status['done'])} of {status['cases']} cases done, {len(status['failed'])} "
        f"failed, {len(status['pending'])} pending -> {out_dir / 'batch_summary.json'}"
    )
    return 1 if status["failed"] or status["pending"] else 0
