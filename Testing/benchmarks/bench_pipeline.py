"""The main job measured: 3D Dice from one box, one 3D ROI and one point, against the
per-slice oracle box, per model, on phantoms and labelled real scans.

Not a test. Labelled real scans are for evaluation only: nothing here tunes on them
(``--sweep`` runs on phantoms alone).

    PYTHONPATH=. .venv/bin/python Testing/benchmarks/bench_pipeline.py \\
        --models litemedsam --evaldata /work/evaldata --out pipeline.json
    PYTHONPATH=. .venv/bin/python Testing/benchmarks/bench_pipeline.py --sweep --cases phantoms

``--engine openvino`` runs the lite encoder faster (same outputs to 4e-6), ``--cache
DIR`` keeps embeddings between runs, ``--no-tighten`` turns off the 3D ROI's first-box
tightening (for an A/B in the same conditions); ``--out`` is rewritten after each row.
``--slice-step 1 2`` runs each mode but the oracle at each propagation stride
(``PropagationOptions.slice_step``), each on a fresh session (a ``--cache`` shares the
embeddings between them: then only step 1's time includes encoding), and prints the mean
Dice, seconds and slices encoded per model, mode and step.

Per case (the reference mask ``truth``, slices along the axial axis):

- ``oracle``: a box on every slice of the truth (its box + 10 %, at least 1 px), no
  propagation: the best a box-driven model does slice by slice.
- ``box``: the truth's box on its central slice (a flat, one-slice ROI, + 10 %),
  ``segment_volume`` with ``propagate`` (the library's default rules).
- ``roi3d``: the truth's 3D box + 3 mm as a 3D ROI, propagated.
- ``point``: one positive point, the deepest point of the truth's central slice (the
  library's point search chooses a box from it: ``point_choice`` names the candidate).
- ``box-ends``, ``point-ends``: ``box`` and ``point`` with every stop rule off and the
  propagation bounded to the truth's first and last slices: propagation that stops
  exactly where the structure ends. Against the oracle, what the carried prompt loses;
  against ``box`` / ``point``, what the stop rules lose (evaluation only: it reads the
  truth's extent).

Prints one line per case and mode (Dice, slices covered / truth slices, why each end
stopped, zoom) and a table of gaps to the oracle; ``--out`` writes all as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

import RobustMedSAMLib.inference.segment_volume as segment_volume_module
from RobustMedSAMLib.datasets import phantoms
from RobustMedSAMLib.formats.volume import Volume, read_volume
from RobustMedSAMLib.inference.loader import load_named_model
from RobustMedSAMLib.inference.mask_prompts import mask_box
from RobustMedSAMLib.inference.propagation import PropagationOptions
from RobustMedSAMLib.inference.segment_volume import SegmentOptions, VolumePrompts, segment_volume
from RobustMedSAMLib.inference.session import SegmentationSession
from RobustMedSAMLib.inference.slicing import get_slice, ijk_box_roi, roi_voxels, set_slice
from RobustMedSAMLib.inference.types import SlicePrompt

MODES = ("oracle", "box", "roi3d", "point")
END_MODES = ("box-ends", "point-ends")
ROI_MARGIN_MM = 3.0
BOX_EXTENSION = 0.1


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def phantom_cases() -> dict[str, tuple[Volume, np.ndarray]]:
    """Phantoms with a known mask (CT-like texture), on axis-aligned grids."""
    made = {
        "sphere": phantoms.sphere((40, 96, 96), spacing=(0.8, 0.8, 2.0), radius=18.0),
        "ellipsoid": phantoms.ellipsoid(
            (40, 96, 96), (0.8, 0.8, 2.0), (24.0, 14.0, 22.0), (20.0, 0.0, 30.0)
        ),
        "tube": phantoms.tube((48, 96, 96), (1.0, 1.0, 1.5)),
        "liver_scene": phantoms.organ_scene(target="liver"),
        # harder: neighbours of similar intensity, MR texture, noise, low contrast
        "spleen_scene": phantoms.organ_scene(target="spleen", noise=40.0),
        "kidney_scene_mr": phantoms.organ_scene(target="kidney_left", texture="mr"),
        "lesion_scene": phantoms.organ_scene(target="lesion", noise=30.0, seed=1),
        "faint_sphere": phantoms.sphere(
            (32, 96, 96), spacing=(0.8, 0.8, 2.5), radius=12.0, contrast=25.0, noise=20.0
        ),
        # a tilted elongated ellipsoid: a 3D ROI's footprint is far larger than any slice
        "tilted": phantoms.ellipsoid(
            (24, 96, 96), (0.8, 0.8, 3.0), (26.0, 9.0, 12.0), (0.0, 40.0, 30.0)
        ),
        # thick MR slices (6.5 mm) through a ball: the area changes fast slice to slice
        "thick_sphere": phantoms.sphere(
            (16, 128, 128), (0.8, 0.8, 6.5), 22.0, texture="mr", seed=2
        ),
        "mr_sphere": phantoms.sphere((24, 128, 128), (0.8, 0.8, 4.0), 14.0, texture="mr"),
    }
    return {
        name: (Volume(p.image.astype(np.float32), p.ijk_to_ras, name), p.mask)
        for name, p in made.items()
    }


def real_cases(folder: Path) -> dict[str, tuple[Volume, np.ndarray]]:
    """``images/NAME.nii.gz`` + ``labels/NAME.nii.gz`` pairs (label 1 = the structure)."""
    cases = {}
    for image in sorted((folder / "images").glob("*.nii.gz")):
        label = folder / "labels" / image.name
        if label.is_file():
            volume = read_volume(image)
            cases[image.name.removesuffix(".nii.gz")] = (volume, read_volume(label).array > 0)
    return cases


def held_slices(mask: np.ndarray, axis: int) -> np.ndarray:
    """The indices along ``axis`` of the slices where ``mask`` holds a voxel."""
    return np.flatnonzero(np.moveaxis(mask, axis, 0).any(axis=(1, 2)))


def central_slice(truth: np.ndarray, axis: int) -> int:
    """The slice of the truth's centroid along ``axis`` (it holds the structure)."""
    slices = held_slices(truth, axis)
    centre = int(round(np.argwhere(truth)[:, axis].mean()))
    return int(slices[np.argmin(np.abs(slices - centre))])


def roi_from_kji(volume: Volume, low_kji: np.ndarray, high_kji: np.ndarray):
    """The ROI between voxel-corner bounds given as KJI."""
    return ijk_box_roi(volume, np.asarray(low_kji)[::-1], np.asarray(high_kji)[::-1])


def flat_box_roi(volume: Volume, truth: np.ndarray, axis: int, index: int):
    """The truth's box on slice ``index`` (+ 10 %) as a one-slice ROI."""
    points = np.argwhere(truth)
    points = points[points[:, axis] == index]
    low, high = points.min(0).astype(float), points.max(0).astype(float)
    grow = np.ceil(BOX_EXTENSION * (high - low + 1))
    low, high = low - grow - 0.5, high + grow + 0.5
    low[axis], high[axis] = index - 0.5, index + 0.5
    return roi_from_kji(volume, low, high)


def roi3d(volume: Volume, truth: np.ndarray):
    """The truth's 3D box + ``ROI_MARGIN_MM`` each side, clipped to the volume."""
    points = np.argwhere(truth)
    margin = ROI_MARGIN_MM / volume.spacing[::-1]  # K, J, I
    low = np.maximum(points.min(0) - 0.5 - margin, -0.5)
    high = np.minimum(points.max(0) + 0.5 + margin, np.array(volume.shape) - 0.5)
    return roi_from_kji(volume, low, high)


def deepest_point(volume: Volume, truth: np.ndarray, axis: int, index: int) -> np.ndarray:
    """RAS of the truth's deepest pixel on slice ``index``."""
    plane = get_slice(truth, axis, index)
    depth = ndimage.distance_transform_edt(np.pad(plane, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(depth)), plane.shape)
    kji = [0, 0, 0]
    kji[axis] = index
    in_plane = [d for d in range(3) if d != axis]
    kji[in_plane[0]], kji[in_plane[1]] = row, col
    return volume.ijk_to_ras_points(np.array(kji[::-1], float))


def oracle(session: SegmentationSession, truth: np.ndarray) -> np.ndarray:
    """A box from the truth on every slice that holds it, one model call each."""
    mask = np.zeros(truth.shape, bool)
    for index in range(session.n_slices):
        plane = get_slice(truth, session.axis, index)
        if plane.any():
            prompt = SlicePrompt(box=mask_box(plane, BOX_EXTENSION))
            set_slice(mask, session.axis, index, session.segment_slice(index, prompt).mask)
    return mask


def run_mode(session, truth, mode: str, options: SegmentOptions) -> dict:
    """One mode on one case: Dice and what the pipeline decided."""
    start = time.perf_counter()
    axis = session.axis
    if mode == "oracle":
        mask, decisions = oracle(session, truth), None
    else:
        if mode in END_MODES:
            mode, options = mode.removesuffix("-ends"), at_truth_ends(truth, axis, options)
        index = central_slice(truth, axis)
        if mode == "box":
            prompts = VolumePrompts(roi=flat_box_roi(session.volume, truth, axis, index))
        elif mode == "roi3d":
            prompts = VolumePrompts(roi=roi3d(session.volume, truth))
        else:
            prompts = VolumePrompts(positive=deepest_point(session.volume, truth, axis, index))
        result = segment_volume(session, prompts, options)
        mask, decisions = result.mask, result.decisions
        if mode == "roi3d":
            outside = int((mask & ~roi_voxels(session.volume, prompts.roi)).sum())
    covered, truth_slices = held_slices(mask, axis), held_slices(truth, axis)
    row = {
        "mode": mode if options.propagation.bounds is None else f"{mode}-ends",
        "dice": round(dice(mask, truth), 4),
        "slices": int(len(covered)),
        "truth_slices": int(len(truth_slices)),
        "outside_truth_slices": int(len(np.setdiff1d(covered, truth_slices))),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if mode == "roi3d":
        row["voxels_outside_roi"] = outside
    if decisions is not None:
        row.update(
            roi=decisions.roi,
            ends=decisions.ends,
            zoom=decisions.zoom,
            window=[round(v, 1) for v in decisions.window],
            tightened=len(decisions.tightened),
        )
        if decisions.point is not None:
            row["point_choice"] = decisions.point.get("source")
    return row


def at_truth_ends(truth: np.ndarray, axis: int, options: SegmentOptions) -> SegmentOptions:
    """``options`` with every stop rule off and the propagation bounded to the slices
    between the truth's first and last (``*-ends`` modes)."""
    slices = held_slices(truth, axis)
    bounds = (int(slices[0]), int(slices[-1]))
    off = dict(iou_threshold=0.0, min_likeness=0.0, min_stability=0.0, min_score=0.0)
    propagation = replace(options.propagation, bounds=bounds, min_area_ratio=0.0, **off)
    return replace(options, propagation=propagation)


def sweep_options() -> list[tuple[str, PropagationOptions]]:
    """Stop-rule settings tried on phantoms (``--sweep``)."""
    settings = []
    for overlap in ("containment", "iou"):
        for threshold in (0.5, 0.8):
            for min_score in (0.0, 0.5):
                for area in (0.5, 0.0):
                    name = f"{overlap}>={threshold},score>={min_score},area>={area}"
                    options = PropagationOptions(
                        overlap=overlap,
                        iou_threshold=threshold,
                        min_score=min_score,
                        min_area_ratio=area,
                    )
                    settings.append((name, options))
    for threshold in (0.5, 0.8):  # the box alone carried (MedSAM's training prompt)
        options = PropagationOptions(projection="box", iou_threshold=threshold)
        settings.append((f"projection=box,containment>={threshold}", options))
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="litemedsam", help="comma-separated model names")
    parser.add_argument("--cases", default="phantoms,real", help="phantoms, real or both")
    parser.add_argument("--only", default="", help="comma-separated case names to run")
    parser.add_argument("--evaldata", type=Path, default=Path("/work/evaldata"))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--sweep", action="store_true", help="stop rules on phantoms only")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rules", default="", help="--sweep: only rules containing these (;)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--engine", default="eager", help="the encoder's CPU engine")
    parser.add_argument("--cache", default=None, help="embedding cache folder (reruns)")
    parser.add_argument(
        "--no-tighten", action="store_true", help="a 3D ROI's first box is not tightened"
    )
    parser.add_argument("--slice-step", type=int, nargs="+", default=[1], help="strides")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    cases: dict[str, tuple[Volume, np.ndarray]] = {}
    if "phantoms" in args.cases:
        cases.update(phantom_cases())
    if "real" in args.cases and not args.sweep:
        cases.update(real_cases(args.evaldata))
    if args.only:
        cases = {k: v for k, v in cases.items() if k in args.only.split(",")}
    if args.no_tighten:
        segment_volume_module.TIGHTEN_STEPS = 0
    rows = []
    for model_name in args.models.split(","):
        loaded = load_named_model(model_name, device="cpu", engine=args.engine)
        for name, (volume, truth) in cases.items():
            session = new_session(volume, loaded, args.cache, model_name)
            if args.sweep:
                for label, propagation in sweep_options():
                    if args.rules and not any(r in label for r in args.rules.split(";")):
                        continue
                    for mode in ("box", "point"):
                        options = SegmentOptions(propagate=True, propagation=propagation)
                        row = run_mode(session, truth, mode, options)
                        row.update(case=name, model=model_name, rule=label)
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                continue
            for mode in args.modes.split(","):
                for step in [1] if mode == "oracle" else args.slice_step:
                    if len(args.slice_step) > 1:
                        session = new_session(volume, loaded, args.cache, model_name)
                    propagation = PropagationOptions(slice_step=step)
                    options = SegmentOptions(propagate=True, propagation=propagation)
                    row = run_mode(session, truth, mode, options)
                    row.update(case=name, model=model_name, window_source=session.window_source,
                               slice_step=step, encoded=session.stats.encoder_calls)  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if args.out:  # written as it goes: a long run stopped early keeps its rows
                        write_rows(args.out, rows)
    if args.sweep:
        summarise_sweep(rows)
    else:
        print_table([r for r in rows if r.get("slice_step", 1) == 1])
        if len(args.slice_step) > 1:
            print_steps(rows)
    if args.out:
        write_rows(args.out, rows)


def new_session(volume: Volume, loaded, cache: str | None, name: str) -> SegmentationSession:
    return SegmentationSession(volume, loaded.predictor(), "axial", disk_cache=cache, model_id=name)


def write_rows(path: Path, rows: list[dict]) -> None:
    machine = {"platform": platform.platform(), "cpus": torch.get_num_threads()}
    path.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))


def print_table(rows: list[dict]) -> None:
    """Markdown: per model and case, Dice per mode run and the gaps to the oracle."""
    modes = [m for m in (*MODES, *END_MODES) if any(r["mode"] == m for r in rows)]
    gapped = [m for m in modes if m != "oracle" and m != "roi3d"]
    heads = modes + [f"{m} - oracle" for m in gapped]
    print("| model | case | " + " | ".join(heads) + " |")
    print("|---|---|" + "---|" * len(heads))
    keys = sorted({(r["model"], r["case"]) for r in rows}, key=lambda k: (k[0], k[1]))
    for model, case in keys:
        by_mode = {r["mode"]: r["dice"] for r in rows if (r["model"], r["case"]) == (model, case)}
        cells = [f"{by_mode[m]:.2f}" if m in by_mode else "-" for m in modes]
        gaps = [
            f"{by_mode[m] - by_mode['oracle']:+.2f}" if {m, "oracle"} <= by_mode.keys() else "-"
            for m in gapped
        ]
        print(f"| {model} | {case} | " + " | ".join(cells + gaps) + " |")


def print_steps(rows: list[dict]) -> None:
    """Markdown: per model, mode and slice step, mean Dice, mean seconds (and their ratio
    to step 1's), slices encoded over all cases."""
    print("| model | mode | step | cases | mean Dice | mean s | s / step 1 | encoded |")
    print("|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["model"], r["mode"], r["slice_step"]) for r in rows if r["mode"] != "oracle"})
    for model, mode, step in keys:
        same = [r for r in rows if (r["model"], r["mode"], r["slice_step"]) == (model, mode, step)]
        first = [r for r in rows if (r["model"], r["mode"], r["slice_step"]) == (model, mode, 1)]
        seconds = np.mean([r["seconds"] for r in same])
        ratio = f"{seconds / np.mean([r['seconds'] for r in first]):.2f}" if first else "-"
        dice_mean = np.mean([r["dice"] for r in same])
        encoded = sum(r["encoded"] for r in same)
        print(f"| {model} | {mode} | {step} | {len(same)} | {dice_mean:.3f} | {seconds:.1f} | "
              f"{ratio} | {encoded} |")  # fmt: skip


def summarise_sweep(rows: list[dict]) -> None:
    """Mean Dice over phantoms per stop rule and mode, best first."""
    rules = sorted({r["rule"] for r in rows})
    means = []
    for rule in rules:
        box = np.mean([r["dice"] for r in rows if r["rule"] == rule and r["mode"] == "box"])
        point = np.mean([r["dice"] for r in rows if r["rule"] == rule and r["mode"] == "point"])
        means.append((box + point, rule, box, point))
    for _, rule, box, point in sorted(means, reverse=True):
        print(f"{rule:40s} box {box:.3f} point {point:.3f}")


if __name__ == "__main__":
    main()
