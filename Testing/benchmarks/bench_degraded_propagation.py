"""3D from one box on corrupted phantoms: Dice per propagation setting.

Not a test. Per organ-scene phantom (CT- and MR-like, 40 slices of 3 mm, 128 x 128 px,
seed 3) and condition (clean, or a corruption at ``--severity``), each organ is
segmented through ``segment_volume`` with propagation, from the truth's box (+10 % each
side) drawn on its central slice as a flat ROI (the pipeline then grows it, refits it,
zooms a small one) or, with ``--prompt point``, one include point at the truth's
deepest pixel there (the point search), once per ``--extensions`` value:
``box_extension``, how far the box carried to the next slice (and the point search's
and the refit's box) reaches past the mask. Prints
every run, then the mean Dice per setting and scene, clean and over the corruptions.
Encoder outputs are cached in ``--cache`` (settings differ in the decoder only).

    PYTHONPATH=. .venv/bin/python Testing/benchmarks/bench_degraded_propagation.py \
        [--model robustmedsam-lite] [--scenes ct mr] [--extensions 0.1 0.05] \
        [--corruptions clean speckle_noise kspace_spike ...] [--prompt box|point] [--cache DIR]

Phantoms only: labelled real scans are never used here (evaluation only).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch
from scipy import ndimage

from RobustMedSAMLib.corruptions import corrupt
from RobustMedSAMLib.datasets import phantoms
from RobustMedSAMLib.evaluation.metrics import dice
from RobustMedSAMLib.formats.volume import Volume
from RobustMedSAMLib.inference.loader import load_named_model
from RobustMedSAMLib.inference.propagation import PropagationOptions
from RobustMedSAMLib.inference.segment_volume import SegmentOptions, VolumePrompts, segment_volume
from RobustMedSAMLib.inference.session import SegmentationSession
from RobustMedSAMLib.inference.slicing import slice_box_roi, slice_point_ras

SPACING = (3.0, 1.0, 1.0)  # mm, (slices, rows, cols)
CONDITIONS = (
    "clean",
    "gaussian_noise",
    "speckle_noise",
    "motion_blur",
    "low_resolution",
    "kspace_spike",
    "jpeg_compression",
)


def scene(texture: str) -> phantoms.Phantom:
    noise = 30.0 if texture == "ct" else None
    return phantoms.organ_scene((40, 128, 128), SPACING[::-1], texture=texture, noise=noise, seed=3)


def drawn_box(truth: np.ndarray) -> tuple[int, np.ndarray]:
    """The truth's central slice and its box + 10 % each side ``(x0, y0, x1, y1)``."""
    slices = np.flatnonzero(truth.any(axis=(1, 2)))
    index = int(slices[len(slices) // 2])
    rows, cols = np.nonzero(truth[index])
    w, h = cols.max() - cols.min(), rows.max() - rows.min()
    box = [cols.min() - 0.1 * w, rows.min() - 0.1 * h, cols.max() + 0.1 * w, rows.max() + 0.1 * h]
    return index, np.array(box, float)


def prompts(volume: Volume, truth: np.ndarray, kind: str) -> VolumePrompts:
    """The box drawn on the truth's central slice, or its deepest pixel as a point."""
    index, box = drawn_box(truth)
    if kind == "box":
        return VolumePrompts(roi=slice_box_roi(volume, 0, index, box))
    depth = ndimage.distance_transform_edt(truth[index])
    row, col = np.unravel_index(int(np.argmax(depth)), depth.shape)
    point = slice_point_ras(volume, 0, index, (float(col), float(row)))
    return VolumePrompts(positive=np.asarray(point, float).reshape(1, 3))


def corrupted(phantom: phantoms.Phantom, condition: str, severity: int) -> np.ndarray:
    image = phantom.image.astype(np.float32)
    if condition == "clean":
        return image
    return corrupt(image, condition, severity, 0, SPACING).astype(np.float32)


def run(args: argparse.Namespace) -> dict[tuple[str, str, str, float], float]:
    predictor = load_named_model(args.model, device="cpu", engine=args.engine).predictor()
    results = {}
    for texture in args.scenes:
        phantom = scene(texture)
        for condition in args.corruptions:
            image = corrupted(phantom, condition, args.severity)
            volume = Volume(image, phantom.ijk_to_ras, f"{texture}-{condition}")
            session = SegmentationSession(
                volume, predictor, 0, disk_cache=args.cache, model_id=args.model
            )
            for value, name in phantom.label_names.items():
                truth = phantom.labels == value
                if name in ("body", "aorta") or truth.any(axis=(1, 2)).sum() < 3:
                    continue
                asked = prompts(volume, truth, args.prompt)
                for extension in args.extensions:
                    propagation = replace(PropagationOptions(), box_extension=extension)
                    options = SegmentOptions(
                        propagate=True, encode_ahead=0, propagation=propagation
                    )
                    score = dice(segment_volume(session, asked, options).mask, truth)
                    results[(texture, condition, name, extension)] = score
                    print(f"{texture} {condition:16s} {name:12s} {extension:<5} Dice {score:.3f}")
    return results


def summary(results: dict, args: argparse.Namespace) -> None:
    print("setting, scene: mean Dice clean / over the corruptions")
    for extension in args.extensions:
        for texture in args.scenes:
            mine = {k: v for k, v in results.items() if k[0] == texture and k[3] == extension}
            clean = [v for k, v in mine.items() if k[1] == "clean"]
            degraded = [v for k, v in mine.items() if k[1] != "clean"]
            print(
                f"box_extension {extension:<5} {texture}: clean {np.mean(clean):.3f} "
                f"({len(clean)}), degraded {np.mean(degraded):.3f} ({len(degraded)})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="robustmedsam-lite")
    parser.add_argument("--engine", default="openvino")
    parser.add_argument("--scenes", nargs="+", default=["ct", "mr"], choices=["ct", "mr"])
    parser.add_argument("--corruptions", nargs="+", default=list(CONDITIONS))
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--prompt", choices=["box", "point"], default="box")
    parser.add_argument("--extensions", nargs="+", type=float, default=[0.1, 0.05])
    parser.add_argument("--cache", default="/tmp/robustmedsam_bench_cache")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    summary(run(args), args)


if __name__ == "__main__":
    main()
