"""Why a flat box loses on thick slices: phantoms built to show it.

Not a test. A small lesion on thick MR slices (6.5 mm, as the labelled brain tumour
scan; the scans are not used here) changes its cross-section fast from slice to slice,
and its box is small enough that the pipeline zooms. Per phantom, each variant's 3D
Dice separates the causes:

- ``oracle``: a box from the truth on every slice, the whole slice (no zoom);
- ``oracle_crop``: the same boxes on the crop the flat box zooms to (what the crop
  alone costs);
- ``box``: the truth's box on the central slice as a flat ROI, ``segment_volume`` with
  the defaults (auto zoom);
- ``box_nozoom``: the same without zoom (what carrying the box costs);
- ``box_wide``: without zoom, the carried box grown by ``--extension`` per side
  instead of the default ``box_extension`` (a box that lags a fast-changing shape);
- ``box_refine`` / ``box_nozoom_refine``: ``box`` / ``box_nozoom`` with each propagated
  slice asked again with its own mask's box (``PropagationOptions.refine_steps``,
  ``--refine``).

    PYTHONPATH=. nice -n 19 .venv/bin/python Testing/benchmarks/bench_thick_slices.py \\
        --threads 1 --out thick.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from bench_pipeline import central_slice, dice, flat_box_roi, oracle

from RobustMedSAMLib.datasets import phantoms
from RobustMedSAMLib.formats.volume import Volume
from RobustMedSAMLib.inference.loader import load_named_model
from RobustMedSAMLib.inference.propagation import PropagationOptions
from RobustMedSAMLib.inference.segment_volume import SegmentOptions, VolumePrompts, segment_volume
from RobustMedSAMLib.inference.session import SegmentationSession
from RobustMedSAMLib.inference.zoom import crop_volume, zoom_region

VARIANTS = ("oracle", "oracle_crop", "box", "box_nozoom", "box_wide", "box_refine",
            "box_nozoom_refine")  # fmt: skip
THICK = (0.78, 0.78, 6.5)  # mm along I, J, K: the brain tumour scan's grid
THIN = (0.78, 0.78, 2.0)


def cases() -> dict[str, phantoms.Phantom]:
    """MR-textured lesions on 256 x 256 slices; thick and thin versions of the same."""
    made = {}
    for label, spacing, n in (("thick", THICK, 12), ("thin", THIN, 40)):
        shape = (n, 256, 256)
        made[f"{label}_tilted"] = phantoms.ellipsoid(
            shape, spacing, (9.0, 7.0, 26.0), (0.0, 40.0, 35.0), texture="mr", seed=3
        )
        made[f"{label}_lobes"] = two_lobes(shape, spacing, seed=4)
    return made


def two_lobes(shape, spacing, seed: int) -> phantoms.Phantom:
    """Two overlapping ellipsoids offset in-plane and along K: a cross-section that moves
    and changes shape (one lobe, both, the other) between slices."""
    first = phantoms.ellipsoid(shape, spacing, (8.0, 7.0, 14.0), (0.0, 0.0, 0.0),
                               center=(94.0, 100.0, 32.0), texture="mr", seed=seed)  # fmt: skip
    second = phantoms.ellipsoid(shape, spacing, (7.0, 9.0, 14.0), (0.0, 0.0, 30.0),
                                center=(106.0, 104.0, 48.0), texture="mr", seed=seed)  # fmt: skip
    mask = first.mask | second.mask
    image = phantoms._single_object_image(mask.astype(np.uint8), "mr", None, None, seed)
    return phantoms.Phantom(image, mask, first.spacing, mask.astype(np.uint8), {1: "lobes"})


def run(session: SegmentationSession, truth: np.ndarray, variant: str, extension: float,
        refine: int = 2):  # fmt: skip
    volume = session.volume
    index = central_slice(truth, 0)
    roi = flat_box_roi(volume, truth, 0, index)
    if variant == "oracle":
        return oracle(session, truth), {}
    if variant == "oracle_crop":
        region = zoom_region(volume, 0, roi)
        crop = SegmentationSession(crop_volume(volume, region), session.predictor,
                                   window=session.window)  # fmt: skip
        mask = np.zeros(truth.shape, bool)
        mask[region] = oracle(crop, truth[region])
        return mask, {"crop": [[r.start, r.stop] for r in region]}
    zoom = "auto" if variant in ("box", "box_refine") else False
    steps = refine if variant.endswith("refine") else 0
    widen = extension if variant == "box_wide" else PropagationOptions().box_extension
    propagation = PropagationOptions(box_extension=widen, refine_steps=steps)
    options = SegmentOptions(propagate=True, zoom=zoom, propagation=propagation)
    result = segment_volume(session, VolumePrompts(roi=roi), options)
    return result.mask, {"zoom": result.decisions.zoom, "ends": result.decisions.ends}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--extension", type=float, default=0.3)
    parser.add_argument("--refine", type=int, default=2, help="refine_steps of *_refine")
    parser.add_argument("--only", default="")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_named_model(args.model, device="cpu")
    rows = []
    for name, phantom in cases().items():
        if args.only and name not in args.only.split(","):
            continue
        volume = Volume(phantom.image.astype(np.float32), phantom.ijk_to_ras, name)
        truth = phantom.mask
        session = SegmentationSession(volume, loaded.predictor())
        for variant in args.variants.split(","):
            start = time.perf_counter()
            mask, extra = run(session, truth, variant, args.extension, args.refine)
            per_slice = [
                round(dice(mask[k], truth[k]), 3) if truth[k].any() or mask[k].any() else None
                for k in range(truth.shape[0])
            ]
            row = {"case": name, "variant": variant, "dice": round(dice(mask, truth), 4),
                   "per_slice": per_slice, "seconds": round(time.perf_counter() - start, 1),
                   **extra}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                machine = {"platform": platform.platform(), "threads": torch.get_num_threads()}
                args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
