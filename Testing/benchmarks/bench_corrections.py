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
Prints the mean Dice after each step on the slice. ``--zoom``: zoom "auto" (a small
target's box is segmented on a crop, ``zoom.py``), no disk cache, and the mean seconds
and encoder calls per correction request too; e.g. ``--targets lesion --seeds 0 1 2 3
--zoom``: a lesion of about 8 px in 96 px slices, whose box zooms.

    PYTHONPATH=. .venv/bin/python Testing/benchmarks/bench_corrections.py \
        [--models robustmedsam-lite litemedsam] [--clicks 3] [--first box|point] \
        [--targets liver spleen kidney_left aorta] [--seeds 2] [--zoom]
"""

from __future__ import annotations

import argparse
import tempfile
import time

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

TARGETS = ["liver", "spleen", "kidney_left", "aorta"]


def ras(volume: Volume, k: int, xy: list[tuple[float, float]]) -> np.ndarray | None:
    """RAS of slice pixels ``(x, y)`` on axial slice ``k`` (None for no point)."""
    if not xy:
        return None
    ijk = np.array([[x, y, k, 1.0] for x, y in xy])
    return (volume.ijk_to_ras @ ijk.T).T[:, :3]


def run_scene(
    predictor,
    scene: tuple[str, str, int],
    clicks: int,
    refined: bool,
    cache: str | None,
    first: str,
    zoom: bool,
) -> tuple[list[float], list[float]]:
    """Dice on the slice after the first prompt and after each correction, and the
    seconds and encoder calls of each correction request."""
    texture, target, seed = scene
    phantom = organ_scene(target=target, texture=texture, seed=seed)
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

    options = SegmentOptions(propagate=False, zoom="auto" if zoom else False)
    current = session()
    positive = [] if first == "box" else [(float(col), float(row))]
    negative, scores, seconds, encodes = [], [], [], []
    for step in range(clicks + 1):
        if not refined:
            current = session()
        prompts = VolumePrompts(ras(volume, k, positive), ras(volume, k, negative), roi)
        start, calls = time.perf_counter(), current.stats.encoder_calls
        mask = segment_volume(current, prompts, options).mask[k]
        if step:
            seconds.append(time.perf_counter() - start)
            encodes.append(current.stats.encoder_calls - calls)
        scores.append(dice(mask, truth))
        click = correction_point(mask, truth) if step < clicks else None
        if click is not None:
            (positive if click.label else negative).append((click.x, click.y))
    return scores, seconds, encodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["robustmedsam-lite", "litemedsam"])
    parser.add_argument("--clicks", type=int, default=3)
    parser.add_argument("--first", choices=("box", "point"), default="box")
    parser.add_argument("--targets", nargs="+", default=TARGETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[2])
    parser.add_argument("--zoom", action="store_true")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    scenes = [(t, name, s) for t in ("ct", "mr") for name in args.targets for s in args.seeds]
    for name in args.models:
        predictor = load_named_model(name, device="cpu").predictor()
        with tempfile.TemporaryDirectory() as folder:
            cache = None if args.zoom else folder  # zoom: the encoder's time counts
            for refined in (True, False):
                runs = [
                    run_scene(predictor, scene, args.clicks, refined, cache, args.first, args.zoom)
                    for scene in scenes
                ]
                mean = " ".join(f"{value:.3f}" for value in np.mean([r[0] for r in runs], axis=0))
                label = "refined" if refined else "afresh"
                line = f"{name:18} {label:8} Dice after the {args.first}, then each click: {mean}"
                if args.zoom:
                    seconds, encodes = np.mean([r[1] for r in runs]), np.mean([r[2] for r in runs])
                    line += f"; a click {seconds:.2f} s, {encodes:.2f} encoder calls"
                print(line, flush=True)


if __name__ == "__main__":
    main()
