"""Dice with and without zoom to the box, per slice, on the MNI T1 worked example.

Not a test (needs the MNI sample, which needs PyPI once):

    .venv/bin/python scripts/fetch_mni_sample.py mni
    .venv/bin/python Testing/benchmarks/bench_zoom.py mni

For each structure (whole brain, lateral ventricles), every 4th axial slice holding
more than 100 voxels of its reference gets a tight one-slice box (ROI) around the
reference on that slice; the same model segments it through ``segment_volume`` with
``zoom`` off and on. Prints the mean 2D Dice of each and their difference.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from RobustMedSAMLib.formats.markups import Roi
from RobustMedSAMLib.formats.segmentation import read_segmentation
from RobustMedSAMLib.formats.volume import Volume, read_volume
from RobustMedSAMLib.inference.loader import load_named_model
from RobustMedSAMLib.inference.segment_volume import SegmentOptions, VolumePrompts, segment_volume
from RobustMedSAMLib.inference.session import SegmentationSession
from RobustMedSAMLib.inference.slicing import ijk_box_roi


def slice_box(volume: Volume, mask: np.ndarray, k: int) -> Roi:
    """A one-slice ROI around ``mask[k]`` (voxel edges), along the volume's axes."""
    rows, cols = np.nonzero(mask[k])
    low = [cols.min() - 0.5, rows.min() - 0.5, k - 0.4]
    return ijk_box_roi(volume, low, [cols.max() + 0.5, rows.max() + 0.5, k + 0.4])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mni", type=Path, help="folder written by fetch_mni_sample.py")
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--checkpoint", type=Path)
    args = parser.parse_args()
    model = load_named_model(args.model, checkpoint=args.checkpoint, device="cpu")
    volume = read_volume(args.mni / "mni152_t1.nii.gz")
    for name in ("brain", "ventricles"):
        reference = read_segmentation(args.mni / f"{name}_reference.seg.nrrd")[0] > 0
        areas = reference.sum(axis=(1, 2))
        indices = [k for k in range(0, reference.shape[0], 4) if areas[k] > 100]
        scores: dict[bool, list[float]] = {False: [], True: []}
        for zoom in scores:
            session = SegmentationSession(volume, model.predictor(), "axial")
            for k in indices:
                prompts = VolumePrompts(roi=slice_box(volume, reference, k))
                result = segment_volume(session, prompts, SegmentOptions(zoom=zoom))
                scores[zoom].append(dice(result.mask[k], reference[k]))
        off, on = np.mean(scores[False]), np.mean(scores[True])
        print(f"{name}: {len(indices)} slices, mean 2D Dice zoom off {off:.3f}, on {on:.3f} "
              f"({on - off:+.3f})")  # fmt: skip
        print("  off " + " ".join(f"{s:.2f}" for s in scores[False]))
        print("  on  " + " ".join(f"{s:.2f}" for s in scores[True]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
