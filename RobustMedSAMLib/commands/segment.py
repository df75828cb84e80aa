"""``robustmedsam segment``: a volume + Slicer markups prompts -> a segmentation file."""

from __future__ import annotations

import argparse
from pathlib import Path

MODELS = ("demo", "sam", "medsam", "robustsam", "medicosam", "fused")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment a volume from Slicer markups prompts (one slice, or 3D with --propagate)",
        description="Segment VOLUME (NRRD, NIfTI, MHA or a DICOM folder) from Slicer markups "
        "files (.mrk.json, LPS or RAS). Writes OUT (.seg.nrrd: a Slicer segmentation; "
        ".nii.gz: a label map) and OUT.json, a record of the run.",
    )
    parser.add_argument("volume", type=Path, help="volume file or DICOM series folder")
    parser.add_argument("--out", required=True, type=Path, help="output .seg.nrrd or .nii.gz")
    prompts = parser.add_argument_group("prompts (Slicer markups JSON)")
    prompts.add_argument("--points", type=Path, help="include points (point list)")
    prompts.add_argument("--negative", type=Path, help="exclude points (point list)")
    prompts.add_argument("--box", type=Path, help="box (ROI)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="demo", choices=MODELS, help="default: demo")
    model.add_argument("--checkpoint", type=Path, help="checkpoint file (overrides the registry)")
    model.add_argument("--encoder", type=Path, help="fused: MedSAM checkpoint for the encoder")
    model.add_argument("--decoder", type=Path, help="fused: RobustSAM checkpoint for the decoder")
    model.add_argument("--device", default="auto", help="auto|cpu|cuda|mps (default: auto)")
    model.add_argument("--half", action="store_true", help="CUDA: bf16/fp16 image encoder")
    model.add_argument("--fast-cpu", action="store_true", help="CPU: int8 image encoder")
    run_group = parser.add_argument_group("slicing and propagation")
    run_group.add_argument("--axis", default="axial", choices=("axial", "coronal", "sagittal"))
    run_group.add_argument("--propagate", action="store_true", help="propagate into 3D")
    run_group.add_argument(
        "--projection",
        default="mask",
        choices=("mask", "box", "points", "points_and_mask", "single_point"),
        help="prompt derived for the next slice (default: mask)",
    )
    run_group.add_argument("--iou-threshold", type=float, default=0.8, help="stop rule (0..1)")
    run_group.add_argument("--min-score", type=float, default=0.0, help="stop on predicted IoU")
    run_group.add_argument("--bounds", type=int, nargs=2, metavar=("FIRST", "LAST"))
    run_group.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"))
    run_group.add_argument("--segment-name", default="Segment_1")
    run_group.add_argument("--cache-dir", type=Path, help="disk cache for slice embeddings")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    from RobustMedSAMLib.download import sha256_of
    from RobustMedSAMLib.errors import InputError
    from RobustMedSAMLib.loader import load_named_model
    from RobustMedSAMLib.markups import read_points, read_roi
    from RobustMedSAMLib.propagation import PropagationOptions
    from RobustMedSAMLib.segment import SegmentOptions, VolumePrompts, run_record, segment_volume
    from RobustMedSAMLib.segmentation_io import Segment, write_segmentation
    from RobustMedSAMLib.session import SegmentationSession
    from RobustMedSAMLib.volume import atomic_output, read_volume

    if not (args.points or args.box):
        raise InputError("no prompt: give --points and/or --box (Slicer markups files)")
    if not args.out.parent.is_dir():
        raise InputError(f"output folder does not exist: {args.out.parent}")
    volume = read_volume(args.volume)
    prompts = VolumePrompts(
        positive=read_points(args.points) if args.points else None,
        negative=read_points(args.negative) if args.negative else None,
        roi=read_roi(args.box) if args.box else None,
    )
    options = SegmentOptions(
        propagate=args.propagate,
        propagation=PropagationOptions(
            projection=args.projection,
            iou_threshold=args.iou_threshold,
            min_score=args.min_score,
            bounds=tuple(args.bounds) if args.bounds else None,
        ),
    )
    options.propagation.validate()
    loaded = load_named_model(
        args.model,
        args.checkpoint,
        args.encoder,
        args.decoder,
        args.device,
        args.half,
        args.fast_cpu,
    )
    session = SegmentationSession(
        volume,
        loaded.predictor(),
        args.axis,
        tuple(args.window) if args.window else None,
        disk_cache=args.cache_dir,
        model_id=_model_id(loaded.checkpoints),
    )
    with tqdm(desc="propagating", unit="slice", disable=not args.propagate) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        result = segment_volume(session, prompts, options, progress=progress)
    segment = Segment(1, args.segment_name, (0.5, 0.68, 0.5))
    write_segmentation(args.out, result.mask.astype("uint8"), volume, [segment])
    model_info = {
        "name": loaded.name,
        "preprocessing": loaded.preprocessing,
        "device": str(loaded.model.device),
        "files": {
            k: {"path": str(p), "sha256": sha256_of(p)} for k, p in loaded.checkpoints.items()
        },
    }
    inputs = {"volume": str(args.volume), "axis": args.axis, "window": list(session.window)}
    record = run_record(result, prompts, options, model_info, inputs)
    record_path = args.out.with_name(args.out.name + ".json")
    with atomic_output(record_path) as temporary:
        temporary.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"wrote {args.out}: {int(result.mask.sum())} voxels on {len(result.slices)} slices "
        f"in {result.seconds:.1f} s ({session.stats.encoder_calls} slices encoded)"
    )
    return 0


def _model_id(files: dict[str, Path]) -> str:
    """Cheap identity of the checkpoint files (path, size, mtime) for the disk cache key."""
    parts = []
    for key, path in sorted(files.items()):
        stat = Path(path).stat()
        parts.append(f"{key}={Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return ";".join(parts)
