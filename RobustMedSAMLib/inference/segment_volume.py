"""The main job: segment a volume from RAS prompts, on one slice or propagated into 3D.

    volume = read_volume("ct.nrrd")
    loaded = load_named_model("litemedsam")
    session = SegmentationSession(volume, loaded.predictor(), axis="axial")
    prompts = VolumePrompts(positive=read_points("tumour.mrk.json"))
    result = segment_volume(session, prompts, SegmentOptions(propagate=True))
    write_segmentation("tumour.seg.nrrd", result.mask, volume)

Shared by the command line, the Slicer module's Logic and scripts.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.formats.markups import Roi
from RobustMedSAMLib.inference.propagation import PropagationOptions, propagate
from RobustMedSAMLib.inference.session import SegmentationSession, SessionStats
from RobustMedSAMLib.inference.slicing import prompts_for_slice, roi_to_slice_box, set_slice
from RobustMedSAMLib.inference.zoom import crop_volume, zoom_region
from RobustMedSAMLib.progress import Cancel, Progress


@dataclass
class VolumePrompts:
    """Prompts in RAS mm: ``Nx3`` positive and negative points, an optional ROI box."""

    positive: np.ndarray | None = None
    negative: np.ndarray | None = None
    roi: Roi | None = None

    def to_dict(self) -> dict[str, Any]:
        roi = None
        if self.roi is not None:
            roi = {k: np.asarray(v).tolist() for k, v in asdict(self.roi).items()}
        return {
            "coordinate_system": "RAS",
            "positive": None if self.positive is None else np.asarray(self.positive).tolist(),
            "negative": None if self.negative is None else np.asarray(self.negative).tolist(),
            "roi": roi,
        }


def read_record_prompts(path: str | Path) -> VolumePrompts:
    """The RAS prompts stored in a run record (``OUT.json``) of an earlier run."""
    try:
        stored = json.loads(Path(path).read_text())["prompts"]
        if stored.get("coordinate_system") != "RAS":
            raise ValueError("prompts are not in RAS")
        roi = stored.get("roi")
        return VolumePrompts(
            positive=_points(stored.get("positive")),
            negative=_points(stored.get("negative")),
            roi=_roi(roi) if roi else None,
        )
    except FileNotFoundError:
        raise InputError(f"run record not found: {path}") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
        raise InputError(f"{path}: not a robustmedsam run record ({error})") from None


def _roi(stored: dict[str, Any]) -> Roi:
    """A record's ROI: ``center_ras`` 3 numbers, ``size`` 3 mm >= 0, ``axes_ras`` a 3x3
    rotation (unit columns, orthogonal); ValueError naming what is wrong."""
    center = np.asarray(stored["center_ras"], float).reshape(3)
    size = np.asarray(stored["size"], float).reshape(3)
    axes = np.asarray(stored["axes_ras"], float).reshape(3, 3)
    if not (np.isfinite(center).all() and np.isfinite(size).all() and np.isfinite(axes).all()):
        raise ValueError("the ROI has non-finite numbers")
    if (size < 0).any():
        raise ValueError(f"the ROI size {size.tolist()} is negative")
    if not np.allclose(axes.T @ axes, np.eye(3), atol=1e-4):
        raise ValueError("the ROI axes_ras are not orthogonal unit vectors")
    return Roi(center_ras=center, size=size, axes_ras=axes)


def _points(values: Any) -> np.ndarray | None:
    if values is None:
        return None
    points = np.asarray(values, float).reshape(-1, 3)
    if not np.isfinite(points).all():
        raise ValueError("a point has non-finite coordinates")
    return points


@dataclass
class SegmentOptions:
    """propagate: grow the prompted slices' masks into 3D (else only prompted slices).
    zoom: with a box (ROI), segment on a crop around it (``zoom.py``): for structures
    small against the slice; the mask is the same size as the volume either way."""

    propagate: bool = False
    propagation: PropagationOptions = field(default_factory=PropagationOptions)
    zoom: bool = False


@dataclass
class SliceScore:
    """One segmented slice: model's predicted IoU, overlap with its neighbour, area (px)."""

    index: int
    score: float
    overlap: float
    area: int
    source: str  # "prompt" or "propagated"


@dataclass
class SegmentationResult:
    """mask: ``(K, J, I)`` bool on the volume's grid; slices: per-slice scores in index
    order; stops: why each propagation direction ended; timings in seconds."""

    mask: np.ndarray
    slices: list[SliceScore]
    stops: list[dict[str, Any]]
    prompted: list[int]
    seconds: float
    stats: SessionStats


def segment_volume(
    session: SegmentationSession,
    prompts: VolumePrompts,
    options: SegmentOptions | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> SegmentationResult:
    """Segment the prompted slices, then (``options.propagate``) propagate outward.

    Raises InputError for prompts outside the volume or empty prompts, CancelledError
    when cancelled (nothing is returned, the volume is untouched).
    """
    options = options or SegmentOptions()
    if options.zoom and prompts.roi is not None:
        return _zoomed(session, prompts, options, progress, cancel)
    start = time.perf_counter()
    volume, axis = session.volume, session.axis
    per_slice = prompts_for_slice(volume, axis, prompts.positive, prompts.negative, prompts.roi)
    seeds, logits, scores = {}, {}, []
    for index, prompt in per_slice.items():
        prediction = session.segment_slice(index, prompt)
        seeds[index], logits[index] = prediction.mask, prediction.low_res_logits
        scores.append(
            SliceScore(index, prediction.score, math.nan, int(prediction.mask.sum()), "prompt")
        )
    stops: list[dict[str, Any]] = []
    slice_masks = {index: mask for index, mask in seeds.items()}
    if options.propagate and any(mask.any() for mask in seeds.values()):
        nonempty = {i: m for i, m in seeds.items() if m.any()}
        result = propagate(
            session,
            nonempty,
            _bounded_by_roi(options.propagation, session, prompts.roi),
            progress,
            cancel,
            seed_logits={i: logits[i] for i in nonempty},
        )
        for record in result.records:
            if record.direction != 0:
                slice_masks[record.index] = result.mask[record.index]
                scores.append(
                    SliceScore(
                        record.index, record.score, record.overlap, record.area, "propagated"
                    )
                )
        stops = [_stop_dict(stop) for stop in result.stops]
    mask = np.zeros(volume.shape, dtype=bool)
    for index, slice_mask in slice_masks.items():
        set_slice(mask, axis, index, slice_mask)
    scores.sort(key=lambda s: s.index)
    return SegmentationResult(
        mask, scores, stops, sorted(per_slice), time.perf_counter() - start, session.stats
    )


def _zoomed(
    session: SegmentationSession,
    prompts: VolumePrompts,
    options: SegmentOptions,
    progress: Progress | None,
    cancel: Cancel | None,
) -> SegmentationResult:
    """``segment_volume`` on a crop around the box, its mask put back in place."""
    volume = session.volume
    region = zoom_region(volume, session.axis, prompts.roi, [prompts.positive, prompts.negative])
    crop = SegmentationSession(
        crop_volume(volume, region),
        session.predictor,
        session.axis,
        window=session.window,
        cache_bytes=session.cache_bytes,
    )
    try:
        result = segment_volume(crop, prompts, replace(options, zoom=False), progress, cancel)
    finally:
        session.stats.add(crop.stats)
    mask = np.zeros(volume.shape, dtype=bool)
    mask[region] = result.mask
    return replace(result, mask=mask, stats=session.stats)


def _bounded_by_roi(
    options: PropagationOptions, session: SegmentationSession, roi: Roi | None
) -> PropagationOptions:
    """A 3D box given by the user bounds propagation to the slices it spans (unless
    bounds were given explicitly): the user has said where the object ends."""
    if roi is None or options.bounds is not None:
        return options
    (first, last), _ = roi_to_slice_box(session.volume, session.axis, roi)
    return replace(options, bounds=(first, last))


def _stop_dict(stop) -> dict[str, Any]:
    rejected = None if stop.rejected is None else _clean(asdict(stop.rejected))
    return {
        "seed": stop.seed,
        "direction": stop.direction,
        "last_index": stop.last_index,
        "reason": stop.reason,
        "rejected": rejected,
    }


def _clean(values: dict[str, Any]) -> dict[str, Any]:
    """NaN -> None, numpy scalars -> Python, for JSON."""
    out = {}
    for key, value in values.items():
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and math.isnan(value):
            value = None
        out[key] = value
    return out


def run_record(
    result: SegmentationResult,
    prompts: VolumePrompts,
    options: SegmentOptions,
    model: dict[str, Any],
    inputs: dict[str, Any],
) -> dict[str, Any]:
    """The audit record written beside each output: enough to replay the run."""
    from RobustMedSAMLib import __version__

    stats = result.stats
    return {
        "robustmedsam_version": __version__,
        "python": platform.python_version(),
        "inputs": inputs,
        "model": model,
        "prompts": prompts.to_dict(),
        "options": {
            "propagate": options.propagate,
            "zoom": options.zoom,
            "propagation": asdict(options.propagation),
        },
        "prompted_slices": result.prompted,
        "slices": [_clean(asdict(s)) for s in result.slices],
        "stops": result.stops,
        "voxels": int(result.mask.sum()),
        "timings": {
            "total_seconds": round(result.seconds, 3),
            "encoder_seconds": round(stats.encoder_seconds, 3),
            "encoder_calls": stats.encoder_calls,
            "decoder_seconds": round(stats.decoder_seconds, 3),
            "decoder_calls": stats.decoder_calls,
        },
    }
