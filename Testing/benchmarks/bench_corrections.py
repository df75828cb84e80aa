"""Correction clicks after a box or a point, on phantoms: the slice's last mask fed back
or not.

Per model and organ-scene phantom (CT- and MR-like, four targets, seed 2), a box drawn
too tight (15 % in from each side of the truth's box on its largest slice) or, with
``--first point``, one include point at the truth's deepest pixel there is segmented
through ``segment_volume`` (no propagation, no zoom), then ``--clicks`` correction clicks
(each at the deepest pixel of the largest error region, as the evaluation harness's) are
added, each a new request with the same box and all points so far: the Slicer panel's
and the Segment Editor effect's flow. ``refined``: one session, so each correction gets
the slice's last mask fed back (``SegmentationSession.correcting``) and, after a point,
the box the point search found for it (``kept_box``); ``afresh``: a new session per
request, so neither (the behaviour before: after a point, a new search per click).
Prints the mean Dice after each step on the slice.

    PYTHONPATH=. .venv/bin/python Testing/benchmarks/bench_corrections.py \
        [--models robustmedsam-lite litemedsam] [--clicks 3] [--first box|point]
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from scipy import ndimage

from RobustMedSAMLib.datasets.phantoms import organ_scene
from RobustMedSAMLib.evaluation.metrics import dice
from RobustMedSAMLib.evaluation.simulated_clicks import correction_point
from RobustMedSAMLib.formats.volume import Volume
from RobustMedSAMLib.inference.loader import load_named_model
from RobustMedSAMLib.inference.mask_prompts import mask_box
from RobustMedSAMLib.inference.segment_volume import SegmentOptions, VolumePrompts, segment_volume
from RobustMedSAMLib.inference.session import SegmentationSession
from RobustMedSAMLib.inference.slicing import slice_box_roi

SCENES = [
    (texture, target)
    for texture in ("ct", "mr")
    for target in ("liver", "spleen", "kidney_left", "aorta")
]
OPTIONS = SegmentOptions(propagate=False, zoom=False)


def ras(volume: Volume, k: int, xy: list[tuple[float, float]]) -> np.ndarray | None:
    """RAS of slice pixels ``(x, y)`` on axial slice ``k`` (None for no point)."""
    if not xy:
        return None
    ijk = np.array([[x, y, k, 1.0] for x, y in xy])
    return (volume.ijk_to_ras @ ijk.T).T[:, :3]


def run_scene(
    predictor, texture: str, target: str, clicks: int, refined: bool, cache: str, first: str
) -> list[float]:
    """Dice on the slice after the first prompt and after each correction."""
    phantom = organ_scene(target=target, texture=texture, seed=2)
    volume = Volume(phantom.image.astype(np.float32), phantom.ijk_to_ras, target)
    k = int(np.argmax(phantom.mask.sum(axis=(1, 2))))
    truth = phantom.mask[k]
    box = mask_box(truth, 0.0).astype(float)
    inset = 0.15 * np.array([box[2] - box[0], box[3] - box[1]])
    box += np.r_[inset, -inset]
    roi = slice_box_roi(volume, 0, k, box) if first == "box" else None
    depth = ndimage.distance_transform_edt(truth)
    row, col = np.unravel_index(np.argmax(depth), depth.shape)

    def session() -> SegmentationSession:
        return SegmentationSession(volume, predictor, 0, disk_cache=cache, model_id=target)

    current = session()
    positive = [] if first == "box" else [(float(col), float(row))]
    negative, scores = [], []
    for step in range(clicks + 1):
        if not refined:
            current = session()
        prompts = VolumePrompts(ras(volume, k, positive), ras(volume, k, negative), roi)
        mask = segment_volume(current, prompts, OPTIONS).mask[k]
        scores.append(dice(mask, truth))
        click = correction_point(mask, truth) if step < clicks else None
        if click is not None:
            (positive if click.label else negative).append((click.x, click.y))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["robustmedsam-lite", "litemedsam"])
    parser.add_argument("--clicks", type=int, default=3)
    parser.add_argument("--first", choices=("box", "point"), default="box")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    for name in args.models:
        predictor = load_named_model(name, device="cpu").predictor()
        with tempfile.TemporaryDirectory() as cache:
            for refined in (True, False):
                rows = [
                    run_scene(predictor, texture, target, args.clicks, refined, cache, args.first)
                    for texture, target in SCENES
                ]
                mean = " ".join(f"{value:.3f}" for value in np.mean(rows, axis=0))
                label = "refined" if refined else "afresh"
                print(f"{name:18} {label:8} Dice after the {args.first}, then each click: {mean}")


if __name__ == "__main__":
    main()
