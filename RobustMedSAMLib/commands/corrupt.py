"""``robustmedsam corrupt``: write a corrupted copy of a volume, same geometry."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "corrupt",
        help="write a corrupted copy of a volume (noise, blur, MR artifacts, ...)",
        description="Degrade a volume with one corruption type at a severity from 1 "
        "(barely visible) to 5 (heavy) and write it with the input's geometry and "
        "voxel type. `robustmedsam corruptions` lists the types.",
    )
    parser.add_argument("volume", help="NRRD, NIfTI or MHA file, or a folder with one DICOM series")
    parser.add_argument(
        "--type",
        required=True,
        dest="corruption",
        metavar="NAME",
        help="corruption type (see `robustmedsam corruptions`)",
    )
    parser.add_argument("--severity", required=True, type=int, metavar="1..5")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", required=True, help="output file (.nrrd, .nii.gz, .mha, ...)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from RobustMedSAMLib.corruptions import corrupt, get_corruption
    from RobustMedSAMLib.errors import InputError
    from RobustMedSAMLib.formats.atomic import check_not_an_input
    from RobustMedSAMLib.formats.volume import Volume, read_volume, write_volume

    spec = get_corruption(args.corruption)  # fail fast, before reading the volume
    spec.level(args.severity)
    if not Path(args.out).parent.is_dir():
        raise InputError(f"output folder does not exist: {Path(args.out).parent}")
    check_not_an_input([args.out], {"the input volume": args.volume})
    volume = read_volume(args.volume)
    spacing_kji = volume.spacing[::-1].tolist()
    start = time.perf_counter()
    array = corrupt(volume.array, spec.name, args.severity, seed=args.seed, spacing=spacing_kji)
    log.info(
        "%s severity %d on %s voxels in %.2f s",
        spec.name,
        args.severity,
        "x".join(map(str, array.shape)),
        time.perf_counter() - start,
    )
    written = write_volume(
        Volume(array, volume.ijk_to_ras, volume.name), args.out, placements_from=args.volume
    )
    print(written)
    return 0
