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
from RobustMedSAMLib.inference.mask_prompts import mask_box
from RobustMedSAMLib.inference.point_search import ANSWER_EXTENSION, search_point
from RobustMedSAMLib.inference.propagation import (
    REFINE_SAME_BOX,
    REFINE_STEPS,
    PropagationOptions,
    ask_again,
    box_iou,
    plan_order,
    propagate,
)
from RobustMedSAMLib.inference.session import ENCODE_AHEAD, SegmentationSession, SessionStats
from RobustMedSAMLib.inference.slicing import (
    FLAT_ROI_SLICES,
    RoiSlices,
    prompts_for_slice,
    roi_thickness,
    roi_to_slice_box,
    set_slice,
    slice_box_roi,
)
from RobustMedSAMLib.inference.types import Prediction, SlicePrompt
from RobustMedSAMLib.inference.zoom import box_is_small, holds, zoom_region
from RobustMedSAMLib.names import SEED_BOX_GROWTH
from RobustMedSAMLib.progress import Cancel, Progress


@dataclass
class VolumePrompts:
    """Prompts in RAS mm: ``Nx3`` positive and negative points, an optional ROI box."""

    positive: np.ndarray | None = None
    negative: np.ndarray | None = None
    roi: Roi | None = None

    def __post_init__(self) -> None:
        self.positive = _prompt_points(self.positive, "positive")
        self.negative = _prompt_points(self.negative, "negative")
        if self.roi is not None and not isinstance(self.roi, Roi):
            raise InputError(
                f"roi must be a Roi (center_ras, size, axes_ras; read_roi(FILE) gives one), "
                f"not {type(self.roi).__name__}"
            )

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


def _prompt_points(values: Any, kind: str) -> np.ndarray | None:
    """``values`` (one point or ``N`` of them) as ``Nx3`` float64 RAS mm, a copy; None
    stays None. InputError for other shapes, non-numbers and non-finite coordinates
    (before: ``cannot reshape``, or a NaN point sent to slice -9223372036854775808)."""
    if values is None:
        return None
    try:
        points = np.array(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(
            f"{kind} points must be numbers (N x 3 RAS mm), not {values!r:.80}"
        ) from None
    if points.size and (points.ndim == 0 or points.shape[-1] != 3):
        raise InputError(
            f"{kind} points have shape {points.shape}: give N x 3 RAS mm (x, y, z per point)"
        )
    points = points.reshape(-1, 3)
    bad = ~np.isfinite(points).all(axis=1)
    if bad.any():
        n = int(np.argmax(bad))
        raise InputError(
            f"{kind} point {n + 1} is {points[n].tolist()}: coordinates must be finite numbers"
        )
    return points


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
    zoom: with a box (ROI), segment on a crop around it (``zoom.py``): ``True`` always,
    ``False`` never, ``"auto"`` (default) when the box is small at the model's input
    (:func:`zoom.box_is_small`); the mask is the same size as the volume either way.
    encode_ahead: slices encoded on a worker thread ahead of the one being segmented, in
    propagation order (0: none; see ``SegmentationSession.encoding_ahead``).
    seed_box_growth: a box drawn on a slice (a flat ROI, ``--box``) has each side moved
    out by this fraction of its width / height, cut to the slice, before the model is
    first asked (a box is usually drawn tight to the visible edge, or inside it); not
    a 3D ROI (it bounds the result) nor the point search's own box. Default
    :data:`SEED_BOX_GROWTH`."""

    propagate: bool = False
    propagation: PropagationOptions = field(default_factory=PropagationOptions)
    zoom: bool | str = "auto"
    encode_ahead: int = ENCODE_AHEAD
    seed_box_growth: float = SEED_BOX_GROWTH

    def validate(self) -> None:
        """Raise InputError naming the first unusable option."""
        if not isinstance(self.propagation, PropagationOptions):
            raise InputError(
                f"propagation must be a PropagationOptions, not {type(self.propagation).__name__}"
            )
        if self.zoom not in (True, False, "auto"):
            raise InputError(f"zoom={self.zoom!r}: use True, False or 'auto'")
        if not isinstance(self.encode_ahead, int) or self.encode_ahead < 0:
            raise InputError(f"encode_ahead={self.encode_ahead!r}: use 0 or more slices")
        growth = self.seed_box_growth
        number = isinstance(growth, int | float) and not isinstance(growth, bool)
        if not (number and math.isfinite(growth) and growth >= 0):
            raise InputError(f"seed_box_growth={growth!r}: use 0 or more (a fraction of the box)")
        self.propagation.validate()


@dataclass
class Decisions:
    """What the pipeline decided, for the run record.

    roi: ``"none"``, ``"2d"`` (an ROI at most ``FLAT_ROI_SLICES`` thick: a box on its
    slice, propagated until the structure ends) or ``"3d"`` (bounds and clips the
    result); roi_slices: its thickness in slices. window: ``(low, high)`` and what
    chose it. zoom: used or not, and why. covered: first and last slice of the mask
    (None if empty); ends: why propagation stopped at the low and the high end.
    point: for points on one slice without a box, the point search
    (``point_search.py``): every candidate, the chosen one and the box it gave, which
    was then segmented as a flat ROI (``roi`` ``"2d"``). tightened: the boxes a 3D ROI's
    first slice was asked again with (its footprint is loose; see ``_tighten``).
    refit: the boxes a flat ROI's slice was asked again with (see ``_refit``).
    seed_box_growth: the growth applied to the drawn box (0: none; see
    ``SegmentOptions``); grown: the boxes first asked after it, ``(x0, y0, x1, y1)``
    slice pixels (of the crop when zoomed), one per prompted slice with a box.
    slice_step: ``PropagationOptions.slice_step``; asked: the slices propagation asked
    the model for, in order (kept or not); filled: the slices interpolated between two
    asked ones (step > 1). A mask ends at the last slice asked and kept at each end:
    nothing past it is extrapolated.
    """

    roi: str = "none"
    roi_slices: float | None = None
    window: tuple[float, float] | None = None
    window_source: str = ""
    zoom: bool = False
    zoom_reason: str = "no box"
    zoom_region: list[list[int]] | None = None  # K, J, I voxel ranges of the crop
    covered: tuple[int, int] | None = None
    ends: dict[str, str] = field(default_factory=dict)
    point: dict[str, Any] | None = None  # the point search: candidates, the chosen one
    tightened: list[list[float]] = field(default_factory=list)  # a 3D ROI's first boxes
    refit: list[list[float]] = field(default_factory=list)  # a flat ROI's re-asked boxes
    projection: str = ""  # the prompt carried to the next slice (see _propagation_options)
    refine_steps: int = 0  # re-asks of each propagated slice with its mask's own box
    seed_box_growth: float = 0.0  # the fraction a drawn box's sides moved out by
    grown: list[list[float]] = field(default_factory=list)  # the drawn boxes, grown
    slice_step: int = 1  # propagation asks every slice_step-th slice, fills the rest
    asked: list[int] = field(default_factory=list)  # slices propagation asked, in order
    filled: list[int] = field(default_factory=list)  # slices interpolated, not asked


@dataclass
class SliceScore:
    """One segmented slice: model's predicted IoU, overlap with its neighbour, area (px)."""

    index: int
    score: float
    overlap: float
    area: int
    source: str  # "prompt", "propagated" or "filled" (interpolated, not asked)
    stability: float = math.nan  # the model's stability score (see predictor.py)
    likeness: float = math.nan  # see PropagationOptions.min_likeness
    likeness_from: str = ""  # what likeness was measured on: "intensity" or "features"


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
    decisions: Decisions = field(default_factory=Decisions)


def segment_volume(
    session: SegmentationSession,
    prompts: VolumePrompts,
    options: SegmentOptions | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    search: bool = True,
    drawn: bool = True,
) -> SegmentationResult:
    """Segment the prompted slices, then (``options.propagate``) propagate outward.

    Points on one slice without a box go through the point search first (``search``;
    see :func:`_from_points`). ``drawn``: the ROI is the user's (a flat one is grown by
    ``options.seed_box_growth``, and refit); False for the point search's box. Raises
    InputError for prompts outside the volume or empty prompts, CancelledError when
    cancelled (nothing is returned, the volume is untouched).
    """
    options = SegmentOptions() if options is None else options
    if not isinstance(options, SegmentOptions):
        raise InputError(
            f"options must be a SegmentOptions, not {type(options).__name__}: give "
            "SegmentOptions(propagate=True, propagation=PropagationOptions(...))"
        )
    options.validate()
    if search and _one_point_slice(session, prompts) is not None:
        return _from_points(session, prompts, options, progress, cancel)
    zoom, reason = _zoom_decision(session, prompts, options)
    if zoom:
        return _zoomed(session, prompts, options, reason, progress, cancel, drawn)
    start = time.perf_counter()
    volume, axis = session.volume, session.axis
    decisions = Decisions(window=session.window, window_source=session.window_source)
    decisions.zoom_reason = reason
    allowed = _roi_decision(session, prompts.roi, decisions)
    per_slice = prompts_for_slice(volume, axis, prompts.positive, prompts.negative, prompts.roi)
    if drawn and decisions.roi == "2d":
        per_slice = _grow_boxes(session, per_slice, options.seed_box_growth, decisions)
    propagation = _propagation_options(options.propagation, session, prompts.roi, decisions)
    order = _encode_order(list(per_slice), session.n_slices, options.propagate, propagation)
    with session.encoding_ahead(order, options.encode_ahead):
        slice_masks, scores, stops = _segment_and_propagate(
            session, per_slice, allowed, decisions, options.propagate, propagation, progress,
            cancel, drawn,
        )  # fmt: skip
    mask = np.zeros(volume.shape, dtype=bool)
    for index, slice_mask in slice_masks.items():
        set_slice(mask, axis, index, slice_mask)
    scores.sort(key=lambda s: s.index)
    kept = [s.index for s in scores if s.area > 0]
    decisions.covered = (min(kept), max(kept)) if kept else None
    decisions.ends = _ends(stops, decisions.covered, options.propagate)
    return SegmentationResult(
        mask,
        scores,
        stops,
        sorted(per_slice),
        time.perf_counter() - start,
        session.stats,
        decisions,
    )


def _encode_order(
    prompted: list[int], n_slices: int, propagating: bool, options: PropagationOptions
) -> list[int]:
    """The slices in the order they will be segmented if no direction stops early: the
    prompted ones, then (propagating) those ``propagation.plan_order`` lists."""
    first, last = options.bounds if options.bounds is not None else (0, n_slices - 1)
    seeds = [z for z in prompted if first <= z <= last]
    if not (propagating and seeds):
        return prompted
    step = options.slice_step
    return prompted + plan_order(seeds, n_slices, options.bounds, options.max_slices, step)


def _segment_and_propagate(
    session: SegmentationSession,
    per_slice: dict,
    allowed: RoiSlices | None,
    decisions: Decisions,
    propagating: bool,
    propagation: PropagationOptions,
    progress: Progress | None,
    cancel: Cancel | None,
    refit: bool = True,
) -> tuple[dict[int, np.ndarray], list[SliceScore], list[dict[str, Any]]]:
    """Segment the prompted slices (a 3D ROI's first box tightened, noted in
    ``decisions``), then propagate from the non-empty ones: the slice masks by index,
    their scores and the propagation stops."""
    seeds, logits, scores = {}, {}, []
    for index, prompt in per_slice.items():
        prediction = session.segment_slice(index, session.correcting(index, prompt))
        session.answered(index, prompt, prediction)
        if allowed is not None and prompt.box is not None:
            prediction = _tighten(session, index, prompt, prediction, decisions)
        elif refit and decisions.roi == "2d" and prompt.box is not None:
            extension = propagation.box_extension
            prediction = _refit(session, index, prompt, prediction, extension, decisions)
        mask = prediction.mask if allowed is None else prediction.mask & allowed[index]
        seeds[index], logits[index] = mask, prediction.low_res_logits
        scores.append(
            SliceScore(
                index, prediction.score, math.nan, int(mask.sum()), "prompt", prediction.stability
            )
        )
    stops: list[dict[str, Any]] = []
    slice_masks = {index: mask for index, mask in seeds.items()}
    if propagating and any(mask.any() for mask in seeds.values()):
        nonempty = {i: m for i, m in seeds.items() if m.any()}
        result = propagate(
            session,
            nonempty,
            propagation,
            progress,
            cancel,
            seed_logits={i: logits[i] for i in nonempty},
            allowed=allowed,
            images=lambda index: windowed_slice(session, index),
            features=session.mask_features,
        )
        for record in result.records:
            if record.direction != 0:
                slice_masks[record.index] = result.mask[record.index]
                scores.append(
                    SliceScore(
                        record.index,
                        record.score,
                        record.overlap,
                        record.area,
                        "propagated",
                        record.stability,
                        record.likeness,
                        record.likeness_from,
                    )
                )
        for index in result.filled:
            slice_masks[index] = result.mask[index]
            area = int(result.mask[index].sum())
            scores.append(SliceScore(index, math.nan, math.nan, area, "filled"))
        decisions.asked, decisions.filled = list(result.requested), list(result.filled)
        stops = [_stop_dict(stop) for stop in result.stops]
    return slice_masks, scores, stops


def _grow_boxes(
    session: SegmentationSession,
    per_slice: dict[int, SlicePrompt],
    growth: float,
    decisions: Decisions,
) -> dict[int, SlicePrompt]:
    """The prompts with each box's sides moved out by ``growth`` x its width / height,
    cut to the slice; the boxes asked go to ``decisions.grown``."""
    decisions.seed_box_growth = float(growth)
    if growth <= 0:
        return per_slice
    rows, cols = session.slice_image(next(iter(per_slice))).shape
    grown = {}
    for index, prompt in per_slice.items():
        if prompt.box is not None:
            box = grow_box(prompt.box, growth, (rows, cols))
            prompt = replace(prompt, box=box)
            decisions.grown.append(box.tolist())
        grown[index] = prompt
    return grown


def grow_box(box: np.ndarray, growth: float, shape: tuple[int, int]) -> np.ndarray:
    """``(x0, y0, x1, y1)`` with each side moved out by ``growth`` x the box's width /
    height, cut to a ``(rows, cols)`` slice (float32)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    dx, dy = growth * (x1 - x0), growth * (y1 - y0)
    rows, cols = shape
    out = (max(x0 - dx, 0.0), max(y0 - dy, 0.0), min(x1 + dx, cols - 1.0), min(y1 + dy, rows - 1.0))
    return np.array(out, np.float32)


TIGHTEN_STEPS = 2  # re-prompts of a 3D ROI's first slice with its own mask's box
TIGHTEN_GAIN = 0.8  # ... when that box is under this fraction of the box before


def _tighten(
    session: SegmentationSession,
    index: int,
    prompt: SlicePrompt,
    prediction: Prediction,
    decisions: Decisions,
) -> Prediction:
    """A 3D ROI's box on its first slice is the ROI's footprint (the union over all its
    slices), loose where the structure is small, and a box-prompted model draws more in
    a loose box. Ask again with the mask's own box (+10 %, cut to the footprint) while
    that box is clearly smaller (``TIGHTEN_GAIN``), at most ``TIGHTEN_STEPS`` times."""

    def tighter(mask: np.ndarray, box: np.ndarray) -> np.ndarray | None:
        tight = mask_box(mask, 0.1)
        tight = np.concatenate([np.maximum(tight[:2], box[:2]), np.minimum(tight[2:], box[2:])])
        return None if _box_area(tight) >= TIGHTEN_GAIN * _box_area(box) else tight

    return ask_again(
        session, index, prompt, prediction, prompt.box, TIGHTEN_STEPS, tighter, decisions.tightened
    )


# re-asks of a flat ROI's slice with the box grown to its mask's box; off (0) by default:
# +0.090 on phantoms' boxes drawn too small, but on the 12 labelled scans (final
# measurement, docs/propagation.md) box mean 0.567 -> 0.556 (one MR kidney 0.50 -> 0.25)
REFIT_STEPS = 0


def _refit(
    session: SegmentationSession,
    index: int,
    prompt: SlicePrompt,
    prediction: Prediction,
    extension: float,
    decisions: Decisions,
) -> Prediction:
    """A box drawn by hand is up to 10 % off on each side; drawn too small it cuts the
    structure, a box-prompted model draws only what the box holds, and propagation
    carries the cut mask's box. Ask again with the box grown to the mask's own box
    (+``extension``) where the mask reaches past it, until it stops changing (IoU
    ``REFINE_SAME_BOX`` with the one before), at most ``REFIT_STEPS`` times; an empty
    answer keeps the one before. The box never shrinks: on phantoms a box 10 % too
    large did best, and the mask in a box too small is often smaller still (refit to
    it, it ratcheted down). The boxes asked go to ``decisions.refit``."""

    def grown(mask: np.ndarray, box: np.ndarray) -> np.ndarray | None:
        own = mask_box(mask, extension)
        again = np.concatenate([np.minimum(own[:2], box[:2]), np.maximum(own[2:], box[2:])])
        return None if box_iou(again, box) >= REFINE_SAME_BOX else again

    box = np.asarray(prompt.box, np.float32)
    return ask_again(session, index, prompt, prediction, box, REFIT_STEPS, grown, decisions.refit)


def _box_area(box: np.ndarray) -> float:
    return float((box[2] - box[0] + 1) * (box[3] - box[1] + 1))


def _one_point_slice(session: SegmentationSession, prompts: VolumePrompts) -> int | None:
    """The slice holding every point when there is no box and a positive point (else
    None): the case for the point search."""
    if prompts.roi is not None or prompts.positive is None or len(prompts.positive) == 0:
        return None
    per_slice = prompts_for_slice(session.volume, session.axis, prompts.positive, prompts.negative)
    if len(per_slice) != 1:
        return None
    return next(iter(per_slice))


def _from_points(
    session: SegmentationSession,
    prompts: VolumePrompts,
    options: SegmentOptions,
    progress: Progress | None,
    cancel: Cancel | None,
) -> SegmentationResult:
    """Points on one slice: search the candidates (``point_search.py``), then segment the
    chosen mask's box (+``ANSWER_EXTENSION``, as the 2D answer) as a flat ROI on that
    slice: the box rules (zoom, propagation, stop rules) follow. With no eligible
    candidate, the points go to the model as they are. Points that add to those of the
    session's last search on that slice (a correction click) go with the box found then,
    and that slice's last mask (``SegmentationSession.kept_box``, ``correcting``), without
    a new search."""
    volume, axis = session.volume, session.axis
    ((index, prompt),) = prompts_for_slice(volume, axis, prompts.positive, prompts.negative).items()
    takes_points = session.takes_points
    kept = session.kept_box(index, prompt)
    if kept is not None:
        roi = slice_box_roi(volume, axis, index, kept)
        boxed = VolumePrompts(prompts.positive, prompts.negative, roi)
        result = segment_volume(session, boxed, options, progress, cancel, drawn=False)
        result.decisions.point = {"slice": index, "takes_points": takes_points,
                                  "kept_box": kept.tolist()}  # fmt: skip
        return result
    choice = search_point(
        lambda p, multimask: session.slice_candidates(index, p, multimask),
        prompt,
        windowed_slice(session, index),
        takes_points,
    )
    record = {
        "slice": index,
        "takes_points": takes_points,
        "chosen": None,
        "box": None,
        "candidates": [c.to_dict() for c in choice.candidates],
    }
    best = choice.candidates[choice.chosen]
    if best.rank < 0:  # nothing holds the points: the plain prompt, as before
        result = segment_volume(session, prompts, options, progress, cancel, search=False)
        result.decisions.point = record
        return result
    box = mask_box(choice.prediction.mask, ANSWER_EXTENSION)
    record.update(chosen=choice.chosen, source=best.source, box=box.tolist())
    session.keep_box(index, prompt, box)
    boxed = VolumePrompts(
        positive=prompts.positive if takes_points else None,
        negative=prompts.negative if takes_points else None,
        roi=slice_box_roi(volume, axis, index, box),
    )
    result = segment_volume(session, boxed, options, progress, cancel, drawn=False)
    result.decisions.point = record
    return result


def windowed_slice(session: SegmentationSession, index: int) -> np.ndarray:
    """Slice ``index`` as the model sees it: ``(rows, cols)`` float32, the session's
    window mapped to 0..1 (clipped)."""
    return session.windowed(index)


def _zoom_decision(
    session: SegmentationSession, prompts: VolumePrompts, options: SegmentOptions
) -> tuple[bool, str]:
    """Whether to segment on a crop around the box, and why."""
    if prompts.roi is None:
        return False, "no box"
    if options.zoom is True:
        return True, "asked"
    if options.zoom is False:
        return False, "not asked"
    _, box = roi_to_slice_box(session.volume, session.axis, prompts.roi)
    rows, cols = session.slice_image(0).shape
    input_size = getattr(session.predictor.preprocessor, "image_size", 256)
    if box_is_small(box, (rows, cols), input_size):
        return True, "auto: box small at the model's input"
    return False, "auto: box large enough"


def _roi_decision(
    session: SegmentationSession, roi: Roi | None, decisions: Decisions
) -> RoiSlices | None:
    """Flat or 3D ROI; for a 3D one, its voxels in slice order ``(n_slices, rows, cols)``
    (made slice by slice: a whole-volume mask was 78 MB on a 512 x 512 x 300 CT)."""
    if roi is None:
        return None
    decisions.roi_slices = roi_thickness(session.volume, session.axis, roi)
    if decisions.roi_slices <= FLAT_ROI_SLICES:
        decisions.roi = "2d"
        return None
    decisions.roi = "3d"
    return RoiSlices(session.volume, roi, session.axis)


def _ends(
    stops: list[dict[str, Any]], covered: tuple[int, int] | None, propagated: bool
) -> dict[str, str]:
    """Why the mask ends where it does, at its low and high slice."""
    if covered is None:
        return {"low": "empty", "high": "empty"}
    if not propagated:
        return {"low": "not propagated", "high": "not propagated"}
    ends = {}
    for name, direction, index in (("low", -1, covered[0]), ("high", 1, covered[1])):
        reasons = [s["reason"] for s in stops if s["direction"] == direction]
        at_end = [
            s["reason"] for s in stops if s["direction"] == direction and s["last_index"] == index
        ]
        ends[name] = (at_end or reasons or ["not propagated"])[0]
    return ends


def _zoomed(
    session: SegmentationSession,
    prompts: VolumePrompts,
    options: SegmentOptions,
    reason: str,
    progress: Progress | None,
    cancel: Cancel | None,
    drawn: bool = True,
) -> SegmentationResult:
    """``segment_volume`` on a crop around the box (the session's crop session, see
    :func:`_crop_for`), its mask put back in place."""
    crop = _crop_for(session, prompts)
    crop.stats = SessionStats()  # this request's work, added to the session's
    try:
        result = segment_volume(
            crop, prompts, replace(options, zoom=False), progress, cancel, drawn=drawn
        )
    finally:
        session.stats.add(crop.stats)
    crop.asked = prompts
    mask = np.zeros(session.volume.shape, dtype=bool)
    mask[crop.region] = result.mask
    crop_ranges = [[r.start, r.stop] for r in crop.region]
    decisions = replace(result.decisions, zoom=True, zoom_reason=reason, zoom_region=crop_ranges)
    return replace(result, mask=mask, stats=session.stats, decisions=decisions)


def _crop_for(session: SegmentationSession, prompts: VolumePrompts) -> SegmentationSession:
    """The crop session to answer ``prompts`` on: that of the last request it corrects
    (the same ROI, its points and more) when the crop holds every point, so that a
    correction click's last mask is in the frame it was made in; else the crop of
    ``zoom.zoom_region`` (a crop kept for that region keeps its encoded slices)."""
    points = [prompts.positive, prompts.negative]
    for crop in session.crop_sessions():
        if isinstance(crop.asked, VolumePrompts) and _adds_points(crop.asked, prompts):
            if holds(session.volume, session.axis, crop.region, prompts.roi, points):
                return session.crop(crop.region)
    return session.crop(zoom_region(session.volume, session.axis, prompts.roi, points))


def _adds_points(last: VolumePrompts, now: VolumePrompts) -> bool:
    """Whether ``now`` has ``last``'s ROI and at least its points (RAS, as given)."""
    if last.roi is None or now.roi is None:
        return False
    same = all(
        np.array_equal(np.asarray(getattr(last.roi, name)), np.asarray(getattr(now.roi, name)))
        for name in ("center_ras", "size", "axes_ras")
    )
    return same and _ras_points(last) <= _ras_points(now)


def _ras_points(prompts: VolumePrompts) -> set[tuple[float, float, float, int]]:
    pairs = ((prompts.positive, 1), (prompts.negative, 0))
    return {
        (*map(float, point), label)
        for points, label in pairs
        if points is not None
        for point in np.asarray(points, float).reshape(-1, 3)
    }


def _propagation_options(
    options: PropagationOptions,
    session: SegmentationSession,
    roi: Roi | None,
    decisions: Decisions,
) -> PropagationOptions:
    """A 3D ROI bounds propagation to the slices it spans (unless bounds were given
    explicitly). Within it the rules that guard against a leak or a jump (overlap,
    area, score) are off: the ROI bounds the mask. The rules that say "no structure
    here" stay on (likeness, stability): an ROI drawn with a margin spans slices past
    the structure, where a box-prompted model still draws a blob (measured on a tilted
    ellipsoid phantom: Dice 0.899 filling every ROI slice, 0.934 with likeness). A
    flat ROI (a box on one slice) leaves all the measured stop rules on.

    A model trained without mask prompts (``"mask"`` not in ``ModelSource.prompts``:
    LiteMedSAM) gets the box alone where the projection would feed its logits back:
    on an MR phantom sphere the fed-back logits made LiteMedSAM's masks overflow it
    (false positives 166 / 72 / 55 / 166 px on its four propagated slices, 125 / 43 /
    29 / 120 with the box alone). ``decisions.projection`` records the one used."""
    options = model_projection(options, session.predictor)
    decisions.projection = options.projection
    decisions.refine_steps = options.refine_steps
    decisions.slice_step = options.slice_step
    if decisions.roi != "3d":
        return options
    (first, last), _ = roi_to_slice_box(session.volume, session.axis, roi)
    bounds = options.bounds if options.bounds is not None else (first, last)
    return replace(options, bounds=bounds, iou_threshold=0.0, min_area_ratio=0.0, min_score=0.0)


def model_projection(options: PropagationOptions, predictor: Any) -> PropagationOptions:
    """``options`` as the pipeline runs them for this model: ``refine_steps`` None becomes
    ``REFINE_STEPS``; a model trained without mask prompts (``"mask"`` not in its
    ``prompts``: LiteMedSAM) gets the box (or the points) alone where the projection
    would feed its own logits back."""
    if options.refine_steps is None:
        options = replace(options, refine_steps=REFINE_STEPS)
    prompts = getattr(predictor, "prompts", ("point", "box", "mask"))
    if "mask" in prompts or options.projection not in ("mask", "points_and_mask"):
        return options
    return replace(options, projection="box" if options.projection == "mask" else "points")


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
            "encode_ahead": options.encode_ahead,
            "seed_box_growth": options.seed_box_growth,
            "propagation": asdict(options.propagation),
        },
        "decisions": asdict(result.decisions),
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
