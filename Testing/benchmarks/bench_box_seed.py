"""One box against one point, propagated into 3D: where the box route loses (phantoms).

Not a test. Per phantom organ, the protocol's first prompts on the central slice
(``evaluation.interactive.first_prompt``: a box whose sides move in or out by up to
10 %, a point from the object's core, seeds 0..N-1), plus a box drawn 10 % too small
on every side (``box_shrunk``), on the edge (``box_exact``: the truth's box) and 10 %
too large (``box_grown``), each segmented into 3D by ``segment_volume`` with the
defaults. Prints per run the 3D Dice, the seed slice's Dice, the slices covered
against the truth's, why each end stopped, the seed slice's re-asks
(``decisions.refit``) and the grown drawn box (``decisions.grown``). ``--refit 2`` turns
the seed refit on (``segment_volume.REFIT_STEPS``, 0 by default). ``--growth 0,0.1`` runs
every prompt once per drawn-box growth (``SegmentOptions.seed_box_growth``; the point
rows do not depend on it: ``--boxes-only`` leaves them out). robustmedsam-lite's
encoder runs with ``--engine eager`` only.

    PYTHONPATH=. nice -n 19 .venv/bin/python Testing/benchmarks/bench_box_seed.py \\
        --threads 1 --seeds 2 --refit 2 --cache /tmp/enc --out refit.json
    PYTHONPATH=. nice -n 10 .venv/bin/python Testing/benchmarks/bench_box_seed.py \\
        --threads 1 --seeds 2 --growth 0,0.05,0.1,0.15,0.2 --boxes-only \\
        --model robustmedsam-lite --engine eager --cache /tmp/grow-enc --out grow.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import numpy as np
import torch

from RobustMedSAMLib.datasets import phantoms
from RobustMedSAMLib.evaluation.interactive import first_prompt
from RobustMedSAMLib.evaluation.metrics import dice
from RobustMedSAMLib.evaluation.volumetric import central_slice, volume_prompts
from RobustMedSAMLib.formats.volume import Volume
from RobustMedSAMLib.inference import segment_volume as pipeline
from RobustMedSAMLib.inference.loader import load_named_model
from RobustMedSAMLib.inference.mask_prompts import mask_box
from RobustMedSAMLib.inference.session import SegmentationSession
from RobustMedSAMLib.inference.types import SlicePrompt


def cases() -> dict[str, phantoms.Phantom]:
    """Abdomen-like organs (CT and MR textures) and a tilted ellipsoid, 128 px slices."""
    made = {}
    for texture in ("ct", "mr"):
        for target in ("liver", "spleen", "kidney_right"):
            made[f"{texture}_{target}"] = phantoms.organ_scene(
                (40, 128, 128), (1.5, 1.5, 2.5), target=target, texture=texture, seed=1
            )
    made["mr_tilted"] = phantoms.ellipsoid(
        (40, 128, 128), (1.0, 1.0, 2.0), (30.0, 18.0, 28.0), (0.0, 35.0, 25.0), texture="mr"
    )
    return made


def scaled_box(truth: np.ndarray, fraction: float) -> SlicePrompt:
    """The truth's box with every side moved out by ``fraction`` of its extent (in if < 0)."""
    x0, y0, x1, y1 = (float(v) for v in mask_box(truth))
    dx, dy = round(fraction * (x1 - x0 + 1)), round(fraction * (y1 - y0 + 1))
    return SlicePrompt(box=(x0 - dx, y0 - dy, x1 + dx, y1 + dy))


def prompts(truth: np.ndarray, seeds: int, points: bool = True) -> dict[str, SlicePrompt]:
    """The prompts tried on one central slice, by name."""
    made = {"box_shrunk": scaled_box(truth, -0.1), "box_exact": scaled_box(truth, 0.0)}
    made["box_grown"] = scaled_box(truth, 0.1)
    for seed in range(seeds):
        made[f"box_j{seed}"] = first_prompt(truth, "box", 0.1, seed)
        if points:
            made[f"point_j{seed}"] = first_prompt(truth, "point", 0.1, seed)
    return made


def run(
    session: SegmentationSession, truth: np.ndarray, prompt: SlicePrompt, growth: float
) -> dict:
    """One prompt on the central slice into 3D: Dice, seed-slice Dice, coverage, ends."""
    index = central_slice(truth)
    options = pipeline.SegmentOptions(propagate=True, encode_ahead=0, seed_box_growth=growth)
    given = volume_prompts(session.volume, 0, index, prompt)
    result = pipeline.segment_volume(session, given, options)
    filled = np.flatnonzero(truth.any(axis=(1, 2)))
    decisions = result.decisions
    return {
        "dice": round(dice(result.mask, truth), 4),
        "seed_dice": round(dice(result.mask[index], truth[index]), 4),
        "covered": list(decisions.covered) if decisions.covered else None,
        "truth": [int(filled[0]), int(filled[-1])],
        "ends": decisions.ends,
        "zoom": decisions.zoom,
        "refit": getattr(decisions, "refit", None),
        "grown": getattr(decisions, "grown", None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--refit", type=int, default=None, help="REFIT_STEPS (0: off)")
    parser.add_argument("--engine", default="openvino", help="the lite encoder's runtime")
    parser.add_argument("--cache", type=Path, help="encoder outputs kept in this folder")
    parser.add_argument("--growth", default="0", help="seed_box_growth values, comma-separated")
    parser.add_argument("--boxes-only", action="store_true", help="leave out the point rows")
    parser.add_argument("--only", default="")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.refit is not None:
        pipeline.REFIT_STEPS = args.refit
    loaded = load_named_model(args.model, device="cpu", engine=args.engine)
    growths = [float(g) for g in args.growth.split(",")]
    rows = []
    for name, phantom in cases().items():
        if args.only and name not in args.only.split(","):
            continue
        volume = Volume(phantom.image.astype(np.float32), phantom.ijk_to_ras, name)
        cache = args.cache / f"{args.model}-{name}" if args.cache else None
        session = SegmentationSession(volume, loaded.predictor(), disk_cache=cache)
        truth = phantom.mask
        made = prompts(truth[central_slice(truth)], args.seeds, not args.boxes_only)
        for growth in growths:
            for label, prompt in made.items():
                row = {"case": name, "prompt": label, "growth": growth}
                row.update(run(session, truth, prompt, growth))
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary(rows)
    if args.out:
        machine = {"platform": platform.platform(), "threads": torch.get_num_threads()}
        args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))


def summary(rows: list[dict]) -> None:
    """Mean 3D Dice per growth and prompt kind (box_j*, point_j*, box_shrunk,
    box_exact, box_grown), and per growth the mean of the box kinds' means."""
    kinds: dict[tuple[float, str], list[float]] = {}
    for row in rows:
        kinds.setdefault((row["growth"], row["prompt"].split("_j")[0]), []).append(row["dice"])
    for (growth, kind), values in kinds.items():
        mean = statistics.mean(values)
        print(f"growth {growth}: {kind}: mean Dice {mean:.3f} over {len(values)} runs")
    for growth in sorted({g for g, _ in kinds}):
        boxes = [statistics.mean(v) for (g, k), v in kinds.items() if g == growth and k != "point"]
        print(f"growth {growth}: box kinds' mean {statistics.mean(boxes):.3f}")


if __name__ == "__main__":
    main()
