"""Per-slice stop signals measured where the truth ends, on phantoms only.

Not a test. From a box on the truth's central slice (+10 %), each direction is walked
slice by slice with no stop rule (only an empty mask ends it, and the walk ends a few
slices past the truth), with and without zoom; every slice's signals are written as
one JSON line with the slice's true and false positive counts, so that any stop rule
can be scored offline by cutting the walks where it fires (this script only records;
``--model`` names the model whose signals are walked).

    PYTHONPATH=. .venv/bin/python Testing/benchmarks/bench_stop_signals.py --out walks.jsonl

Labelled real scans are never used here (evaluation only).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from RobustMedSAMLib.datasets import phantoms
from RobustMedSAMLib.formats.volume import Volume
from RobustMedSAMLib.inference.loader import load_named_model
from RobustMedSAMLib.inference.mask_prompts import ring_around
from RobustMedSAMLib.inference.propagation import LikenessReference, PropagationOptions
from RobustMedSAMLib.inference.segment_volume import SegmentOptions, VolumePrompts, segment_volume
from RobustMedSAMLib.inference.session import SegmentationSession

PAST_END = 4  # slices walked past the truth's last slice


def scenes() -> dict[str, tuple[Volume, dict[str, np.ndarray]]]:
    """Phantom volumes and the targets in each (name -> truth mask)."""
    made: dict[str, tuple[phantoms.Phantom, list[str] | None]] = {
        "mr_sphere": (phantoms.sphere((24, 128, 128), (0.8, 0.8, 4.0), 14.0, texture="mr"), None),
        "scene_ct": (
            phantoms.organ_scene((32, 96, 96), (1.2, 1.2, 4.0), noise=30.0),
            ["spleen", "kidney_left", "lesion"],
        ),
        "thick_sphere": (
            phantoms.sphere((16, 128, 128), (0.8, 0.8, 6.5), 22.0, texture="mr", seed=2),
            None,
        ),
        "random_mr": (phantoms.random_scene((24, 128, 128), texture="mr", seed=5), "all"),
        "tilted": (
            phantoms.ellipsoid((24, 96, 96), (0.8, 0.8, 3.0), (26.0, 9.0, 12.0), (0, 40, 30)),
            None,
        ),
        "faint": (phantoms.sphere((20, 96, 96), (0.8, 0.8, 2.5), 12.0, None, "ct", 25, 20), None),
    }
    out = {}
    for name, (p, targets) in made.items():
        volume = Volume(p.image.astype(np.float32), p.ijk_to_ras, name)
        if targets is None:
            truths = {name: p.mask}
        else:
            values = {v: n for v, n in p.label_names.items()}
            if targets == "all":
                targets = [values[v] for v in np.unique(p.labels) if v]
            truths = {f"{name}/{t}": p.labels == k for k, t in values.items() if t in targets}
        out[name] = (volume, {k: t for k, t in truths.items() if _slices(t) >= 3})
    return out


def _slices(truth: np.ndarray) -> int:
    return int(truth.any(axis=(1, 2)).sum())


class Recorder:
    """Wraps the session class's ``segment_slice`` to keep every prompt and answer."""

    def __init__(self) -> None:
        self.calls: list[tuple[SegmentationSession, int, object, object]] = []
        self._original = SegmentationSession.segment_slice
        recorder = self

        def segment_slice(session, index, prompt):
            prediction = recorder._original(session, index, prompt)
            recorder.calls.append((session, index, prompt, prediction))
            return prediction

        SegmentationSession.segment_slice = segment_slice


def walk_rows(
    session, truth, zoom: bool, recorder: Recorder, box_roi, projection: str = "mask"
) -> list[dict]:
    """One flat box, no stop rule; a row per slice the model answered."""
    recorder.calls.clear()
    none = PropagationOptions(
        projection=projection,
        iou_threshold=0.0,
        min_area_ratio=0.0,
        min_score=0.0,
        min_likeness=0.0,
        min_stability=0.0,
    )
    slices = np.flatnonzero(truth.any(axis=(1, 2)))
    first, last = max(0, slices[0] - PAST_END), min(truth.shape[0] - 1, slices[-1] + PAST_END)
    none.bounds = (int(first), int(last))
    options = SegmentOptions(propagate=True, propagation=none, zoom=zoom)
    result = segment_volume(session, VolumePrompts(roi=box_roi), options)
    region = result.decisions.zoom_region
    offset = (0, 0) if region is None else (region[1][0], region[2][0])
    rows = []
    previous: dict[int, tuple[np.ndarray, int]] = {}
    seed = result.prompted[0]
    calls = recorder.calls
    first = next((i for i, call in enumerate(calls) if call[1] != seed), len(calls))
    seed_session, _, _, seed_answer = recorder.calls[first - 1]
    seed_mask = np.asarray(seed_answer.mask, bool)
    held, around = seed_session.mask_features(seed, [seed_mask, ring_around(seed_mask)])
    reference = LikenessReference("features", held.astype(np.float64), around.astype(np.float64))
    for crop_session, index, prompt, prediction in recorder.calls:
        mask = np.zeros(truth.shape[1:], bool)
        m = prediction.mask
        mask[offset[0] : offset[0] + m.shape[0], offset[1] : offset[1] + m.shape[1]] = m
        true = truth[index]
        scaled = crop_session.windowed(index)  # the slice as the likeness rule sees it
        logits = prediction.low_res_logits[0]
        inside = logits > 0
        prob = float(torch.sigmoid(torch.as_tensor(logits[inside])).mean()) if inside.any() else 0
        box = prompt.box
        box_area = float((box[2] - box[0] + 1) * (box[3] - box[1] + 1)) if box is not None else 0
        area = int(m.sum())
        direction = int(np.sign(index - seed))
        prev_mask, prev_area = previous.get(direction, (None, 0))
        row = {
            "slice": int(index),
            "direction": direction,
            "distance": abs(int(index) - seed),
            "score": round(float(prediction.score), 4),
            "stability": round(float(prediction.stability), 4),
            "probability": round(prob, 4),
            "area": area,
            "area_ratio": round(area / prev_area, 4) if prev_area else None,
            "box_fill": round(area / box_area, 4) if box_area else None,
            "mean": round(float(scaled[m].mean()), 4) if area else None,
            "ring": _ring_mean(scaled, m) if area else None,
            "feature_likeness": round(
                reference.likeness(index, m, crop_session.windowed, crop_session.mask_features), 4
            )
            if area
            else None,
            "std": round(float(scaled[m].std()), 4) if area else None,
            "tp": int((mask & true).sum()),
            "fp": int((mask & ~true).sum()),
            "truth": int(true.sum()),
        }
        if prev_mask is not None and area:
            inter = int((prev_mask & m).sum())
            row["containment"] = round(inter / max(1, min(area, int(prev_mask.sum()))), 4)
        rows.append(row)
        if area:
            previous[direction] = (m, area)
            if direction == 0:
                previous[-1] = previous[1] = (m, area)
    truth_total = int(truth.sum())
    return [dict(r, truth_total=truth_total, zoom=bool(result.decisions.zoom)) for r in rows]


def _ring_mean(scaled: np.ndarray, mask: np.ndarray) -> float | None:
    """Mean of ``scaled`` over the ring around ``mask`` (``mask_prompts.ring_around``)."""
    ring = ring_around(mask)
    return round(float(scaled[ring].mean()), 4) if ring.any() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--out", type=Path, default=Path("walks.jsonl"))
    parser.add_argument("--only", default="", help="comma-separated scene names")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--engine", default="openvino")
    parser.add_argument("--projection", default="mask", help="mask (box + logits) or box")
    parser.add_argument("--targets", default="", help="comma-separated targets (scene/name)")
    parser.add_argument("--cache", default="/tmp/robustmedsam_bench_cache", help="embeddings")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench_pipeline import flat_box_roi

    loaded = load_named_model(args.model, device="cpu", engine=args.engine)
    recorder = Recorder()
    with args.out.open("a") as out:
        for name, (volume, truths) in scenes().items():
            if args.only and name not in args.only.split(","):
                continue
            session = SegmentationSession(
                volume, loaded.predictor(), "axial", disk_cache=args.cache, model_id=args.model
            )
            for target, truth in truths.items():
                if args.targets and target not in args.targets.split(","):
                    continue
                slices = np.flatnonzero(truth.any(axis=(1, 2)))
                centre = int(slices[np.argmin(np.abs(slices - np.argwhere(truth)[:, 0].mean()))])
                roi = flat_box_roi(volume, truth, 0, centre)
                for zoom in (False, True):
                    start = time.perf_counter()
                    rows = walk_rows(session, truth, zoom, recorder, roi, args.projection)
                    for row in rows:
                        row.update(case=target, model=args.model, projection=args.projection)
                        out.write(json.dumps(row) + "\n")
                    out.flush()
                    seconds = time.perf_counter() - start
                    print(target, zoom, len(rows), f"{seconds:.0f}s", flush=True)


if __name__ == "__main__":
    main()
