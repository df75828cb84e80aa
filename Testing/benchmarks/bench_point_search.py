"""Which candidate a single point should choose: every candidate of the point search
(``inference/point_search.py``) with its signals and its Dice against the truth slice,
on phantoms only (labelled real scans are for evaluation: bench_pipeline.py).

Not a test. Per phantom target, the deepest point of its central slice and a point
halfway from there to the edge; one JSON line per candidate; ``--summary`` prints the
Dice each selection rule gets.

    PYTHONPATH=. .venv/bin/python Testing/benchmarks/bench_point_search.py --out points.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from bench_stop_signals import scenes
from scipy import ndimage

from RobustMedSAMLib.inference.loader import load_named_model
from RobustMedSAMLib.inference.point_search import search_point
from RobustMedSAMLib.inference.segment_volume import windowed_slice
from RobustMedSAMLib.inference.session import SegmentationSession
from RobustMedSAMLib.inference.types import SlicePrompt


def test_points(plane: np.ndarray) -> dict[str, tuple[float, float]]:
    """The deepest pixel of ``plane`` and one halfway from it to the nearest edge."""
    depth = ndimage.distance_transform_edt(np.pad(plane, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(depth)), plane.shape)
    half = np.argwhere((depth > 0) & (np.abs(depth - depth.max() / 2) <= 1))
    near = half[np.argmin(((half - (row, col)) ** 2).sum(1))] if len(half) else (row, col)
    return {"deep": (float(col), float(row)), "half": (float(near[1]), float(near[0]))}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--out", type=Path, default=Path("points.jsonl"))
    parser.add_argument("--engine", default="openvino")
    parser.add_argument("--cache", default="/tmp/robustmedsam_bench_cache")
    parser.add_argument("--only", default="")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    loaded = load_named_model(args.model, device="cpu", engine=args.engine)
    with args.out.open("a") as out:
        for name, (volume, truths) in scenes().items():
            if args.only and name not in args.only.split(","):
                continue
            session = SegmentationSession(
                volume, loaded.predictor(), "axial", disk_cache=args.cache, model_id=args.model
            )
            takes_points = "point" in loaded.prompts
            for target, truth in truths.items():
                slices = np.flatnonzero(truth.any(axis=(1, 2)))
                centre = int(slices[np.argmin(np.abs(slices - np.argwhere(truth)[:, 0].mean()))])
                plane = truth[centre]
                for where, xy in test_points(plane).items():
                    prompt = SlicePrompt([xy], [1])

                    def segment(p, multimask, centre=centre, session=session):
                        return session.slice_candidates(centre, p, multimask)

                    image = windowed_slice(session, centre)
                    choice = search_point(segment, prompt, image, takes_points)
                    for n, candidate in enumerate(choice.candidates):
                        row = candidate.to_dict()
                        mask = np.asarray(choice.answers[n].mask, bool)
                        row.update(case=target, point=where, n=n, chosen=n == choice.chosen)
                        row["dice"] = round(dice(mask, plane), 4)
                        out.write(json.dumps(row) + "\n")
                    out.flush()
                    best = choice.candidates[choice.chosen]
                    print(target, where, best.source, flush=True)


if __name__ == "__main__":
    main()
