"""Segment a volume in Slicer without its window, through the module's Logic.

    Slicer --no-main-window --python-script scripts/batch_segment.py -- \\
        VOLUME --points P.mrk.json --out OUT.seg.nrrd [--negative N.mrk.json] \\
        [--box ROI.mrk.json] [--model NAME] [--checkpoint FILE] [--device auto] \\
        [--axis axial] [--no-propagate]

Loads the files as Slicer nodes (``slicer.util.loadVolume`` / ``loadMarkups``), runs
``RobustMedSAMLogic.segment`` and saves the segmentation node. Exit status 0 on
success, 2 with one line on stderr for a library error or bad arguments, 1 with the
traceback for anything else: Slicer always exits (with ``--python-script`` alone it
would otherwise stay running without a window after an uncaught exception). Without
Slicer, use the ``robustmedsam segment`` command line instead.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from pathlib import Path


def parse(argv: list[str]) -> argparse.Namespace:
    from RobustMedSAMLib.names import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="batch_segment.py", description=__doc__.split("\n")[0])
    parser.add_argument("volume", type=Path)
    parser.add_argument("--out", required=True, type=Path, help="output .seg.nrrd")
    parser.add_argument("--points", type=Path, help="include points (.mrk.json)")
    parser.add_argument("--negative", type=Path, help="exclude points (.mrk.json)")
    parser.add_argument("--box", type=Path, help="ROI (.mrk.json)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"default: {DEFAULT_MODEL}")
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--axis", default="axial", choices=("axial", "coronal", "sagittal"))
    parser.add_argument("--no-propagate", action="store_true", help="prompted slices only")
    parser.add_argument("--segment-name", default="Segment_1")
    return parser.parse_args(argv[1:] if argv[:1] == ["--"] else argv)


def load(path: Path | None, loader):
    return None if path is None else loader(str(path))


def main(argv: list[str]) -> int:
    import slicer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "RobustMedSAM"))
    from RobustMedSAM import RobustMedSAMLogic
    from RobustMedSAMLib.errors import RobustMedSAMError
    from RobustMedSAMLib.inference.segment_volume import SegmentOptions

    args = parse(argv)
    logic = RobustMedSAMLogic()
    try:
        volume_node = slicer.util.loadVolume(str(args.volume))
        points = [load(p, slicer.util.loadMarkups) for p in (args.points, args.negative, args.box)]
        prompts = logic.prompts_from_nodes(*points)
        session = logic.start_session(
            volume_node, args.model, args.checkpoint, args.device, args.axis
        )
        segmentation_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        scores = logic.segment(
            session,
            prompts,
            SegmentOptions(propagate=not args.no_propagate),
            segmentation_node,
            segment_name=args.segment_name,
        )
        logic.save_segmentation(segmentation_node, args.out)
    except (RobustMedSAMError, RuntimeError) as error:
        print(f"batch_segment: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({len(scores)} slices)")
    return 0


def run(argv: list[str], exit_function: Callable[[int], object]) -> None:
    """``main(argv)``, then always ``exit_function(status)``, whatever happened.

    Slicer sets "run and exit" only for ``-c``, an extra script or ``--testing``, not
    for ``--python-script`` (Slicer ``qSlicerCoreCommandOptions.cxx:120-137``), so an
    exception escaping the script would leave a window-less Slicer running forever."""
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse: --help (0) or bad arguments (2)
        code = stop.code if isinstance(stop.code, int) else 2
    except BaseException:  # noqa: BLE001 (anything, even a missing torch: report and exit)
        traceback.print_exc()
        code = 1
    exit_function(code)


def slicer_exit(code: int) -> None:
    """``slicer.util.exit`` (it ends the application's event loop); ``sys.exit`` outside."""
    try:
        import slicer

        slicer.util.exit(code)
    except (ImportError, AttributeError):
        sys.exit(code)


if __name__ == "__main__":
    run(sys.argv[1:], slicer_exit)
