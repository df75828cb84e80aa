"""Propagate slice masks through a volume: masks on one or more seed slices
become a 3D mask, one model call per slice.

Frame: a segmenter's slices ``0..n_slices-1`` along its axis. 2D masks are
``(rows, cols)`` bool in slice pixels; points are ``(x, y) = (col, row)``; boxes
``(x0, y0, x1, y1)`` with inclusive corners; mask inputs are the model's own
low-resolution logits (``1x256x256`` for SAM-size models), fed back unchanged.
The 3D result is ``(n_slices, rows, cols)`` bool in the segmenter's slice order.

From each seed a *front* walks outward in both directions; the prompt for slice
``z ± 1`` is derived from the mask kept on ``z`` (the *projection*). Between two
seeds the two fronts fill the gap from both sides and meet in the middle; a slice
whose both neighbours are known is prompted from their union. Fronts advance
nearest first (distance from their seed, then slice index), which is the order
:func:`plan_order` returns, so a caller can encode slices ahead of time; no slice
is requested twice, and none that propagation will not use.

With ``slice_step`` N > 1 a front jumps N slices at a time (never past the bounds, the
volume's end or a taken slice: it asks the last free slice before them), and the slices
it jumped over are filled by interpolating the signed distance maps of the two asked
masks on either side (:func:`fill_between`). A jump a stop rule rejects is not the end:
the front asks the slices it skipped one at a time, and ends where one of them is
rejected or at the rejected slice (with the jump's reason). A jump onto a slice outside
the ``allowed`` region is not asked: the front comes back the same way (then goes on one
slice at a time). Nothing is extrapolated past the last slice a front kept.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from RobustMedSAMLib.errors import CancelledError, InputError
from RobustMedSAMLib.inference.mask_prompts import (
    exterior_points,
    intensity_contrast,
    interior_points,
    mask_box,
    ring_around,
)
from RobustMedSAMLib.inference.types import Prediction, SlicePrompt, SliceSegmenter
from RobustMedSAMLib.names import (
    DEFAULT_BOX_EXTENSION,
    DEFAULT_LIKENESS,
    DEFAULT_OVERLAP,
    DEFAULT_STABILITY,
    OVERLAP_MEASURES,
    PROJECTIONS,
)
from RobustMedSAMLib.progress import Cancel, Progress, cancel_check

logger = logging.getLogger(__name__)

STOP_REASONS = (
    "empty",  # the model returned an empty mask (never kept)
    "score",  # predicted IoU under min_score
    "overlap",  # overlap with the previous slice under iou_threshold
    "area",  # area grew far beyond the last slices' areas: a leak (min_area_ratio)
    "likeness",  # the mask holds what surrounded the seed, not what the seed held
    "stability",  # the model's stability score under min_stability: it lost the structure
    "roi",  # the carried box has left the 3D ROI's footprint on the next slice
    "met",  # reached a seed or a slice another front already took
    "bounds",  # reached the user's bounds
    "volume_end",  # reached the first or last slice of the volume
    "max_slices",  # the budget of model calls is spent
)
# DEFAULT_OVERLAP (bench_pipeline.py --sweep), DEFAULT_LIKENESS and DEFAULT_STABILITY
# (bench_stop_signals.py), measured on phantoms, live in names.py (the CLI and the panel
# import them without torch)
MIN_CONTRAST = 0.05
"""Least |seed inside - seed ring| (window units, 0..1) for the likeness rule to judge."""
MIN_FEATURE_CONTRAST = 0.02
"""Least cosine distance between the embedding's means over the seed and its ring for
the feature likeness to judge (see ``seed_reference``)."""
Features = Callable[[int, Sequence[np.ndarray]], np.ndarray]
"""``(slice index, masks) -> N x C``: the slice's mean image embedding under each mask."""
REFINE_SAME_BOX = 0.9
"""A refined box whose IoU with the box before is at least this ends the refinement."""
REFINE_STEPS = 0
"""The pipeline's ``refine_steps``: off, the phantoms were mixed (docs/propagation.md)."""


@dataclass
class PropagationOptions:
    """How the prompt for the next slice is derived, and when a direction stops.

    projection: ``"mask"`` (default; as micro-sam's ``"mask"``): the box of the
    mask plus the model's low-res logits for it as ``mask_input`` (left out on
    the first step from a seed given without logits); ``"box"``: the box alone
    (MedSAM's training prompt); ``"points"``: ``n_positive`` interior and
    ``n_negative`` exterior points; ``"points_and_mask"``: those points plus
    ``mask_input``; ``"single_point"``: the deepest interior point alone.
    box_extension: each side of the box moves out by this fraction of the box's
    width / height (at least 1 px when > 0), the same over a jump of ``slice_step``
    slices. Default 0.1 leaves the object room to grow from one slice to the next
    (micro-sam's default is 0); 0.05 won on corrupted phantoms and lost on the labelled
    real scans (docs/propagation.md, "The carried box's margin").
    n_positive: the deepest point of each sizeable component, then points spread
    over the interior core (distance to the edge >= half its maximum).
    n_negative: points spread around a ring outside the mask, at
    ``max(3, r / 4)`` px from it (``r`` = radius of a disc of the mask's area).
    iou_threshold: stop a direction when the overlap of the new mask with the
    previous slice's mask is under it (default 0.5; micro-sam's 0.8 stopped after one
    slice on noisy and faint phantoms: see docs/propagation.md; 0 disables).
    overlap: how that overlap is measured. ``"containment"`` (default):
    intersection over the smaller mask; it lets an object shrink towards its
    ends and tolerates a model drawing a little wider than the user's seed,
    yet catches a jump to another place; ``min_area_ratio`` catches leaks.
    ``"iou"``: micro-sam's rule; it cuts the caps of round objects (IoU of
    concentric discs is their area ratio) and often stops at once on small ones.
    min_score: stop when the model's predicted IoU is under it (default 0: off;
    SAM-like models usually score a wrong mask under about 0.5).
    min_area_ratio: stop when the area is over its inverse times the larger of the
    last two kept areas (a leak). Default 0: off. On the phantom walks
    (bench_stop_signals.py) it never changed a result, and a structure with a
    narrow waist (a kidney's hilum, a bilobed lesion) doubles its area legitimately
    past the waist: it stopped there (tested). Leaks into other tissue are caught by
    likeness, jumps by overlap and stability. (It used to extrapolate the last two
    areas' trend, which stopped even a gentle waist.)
    min_likeness: stop when the new mask holds what surrounded the seed rather than
    what the seed held: likeness = (mean inside the mask - mean of a ring around the
    seed mask) / (mean inside the seed mask - that ring mean), intensities of the
    windowed slice (0..1), under ``min_likeness`` (default 0.5; 0 disables). A
    box-prompted model past a structure's end still draws a blob in the box it is
    given, with a predicted IoU and stability as high as on the structure
    (measured: bench_stop_signals.py); only what the blob holds tells. Needs the
    ``images`` of :func:`propagate`; off for a seed whose contrast with its ring is
    under ``MIN_CONTRAST`` unless ``features`` are given to :func:`propagate`: then
    the same measure is taken on the image embedding's means (the seed's, its ring's,
    the new mask's), off when those differ by a cosine distance under
    ``MIN_FEATURE_CONTRAST``.
    min_stability: stop when the model's stability score (IoU of its mask at logits
    +1 and -1) is under it (default 0.2; 0 disables): on phantoms it fell to 0.04-0.09
    only where the model jumped to a neighbour, and stayed >= 0.25 on the structure.
    stop_between_seeds: apply the score / overlap / area rules between two seeds
    too. Default False (as micro-sam): the user has said the object spans the
    gap. An empty mask always stops a direction and is never kept.
    refine_steps: with a box prompt, ask each propagated slice again with its own
    mask's box (+``box_extension``, cut to the ROI's footprint) up to this many times,
    until the box stops changing (:data:`REFINE_SAME_BOX`): the box carried from the
    slice before lags a cross-section that moves or shrinks between thick slices, and a
    box-prompted model draws more in a loose box (see docs/propagation.md). None: 0
    here, :data:`REFINE_STEPS` in the pipeline (``segment_volume``, the server's jobs).
    bounds: ``(first, last)`` slices, inclusive; None = the whole volume.
    max_slices: at most this many model calls in all; None = no limit.
    slice_step: ask the model on every N-th slice from each seed outward (1, default:
    every slice) and fill the slices in between from the masks on either side
    (:func:`fill_between`); for thin-slice volumes, where the encoder bounds the time
    (docs/propagation.md). The stop rules then compare masks N slices apart, and a
    front ends at the last slice it asked and kept: where a jump is rejected it asks
    the slices it skipped one by one (at most N - 1 more asks per direction), so the
    stop rules judge adjacent slices at a structure's end, as with 1.
    """

    projection: str = "mask"
    box_extension: float = DEFAULT_BOX_EXTENSION
    n_positive: int = 3
    n_negative: int = 2
    iou_threshold: float = DEFAULT_OVERLAP
    overlap: str = "containment"
    min_score: float = 0.0
    min_area_ratio: float = 0.0
    min_likeness: float = DEFAULT_LIKENESS
    min_stability: float = DEFAULT_STABILITY
    stop_between_seeds: bool = False
    refine_steps: int | None = None
    bounds: tuple[int, int] | None = None
    max_slices: int | None = None
    slice_step: int = 1

    def validate(self) -> None:
        """Raise InputError naming the first unusable option."""
        if self.projection not in PROJECTIONS:
            raise InputError(f"unknown projection {self.projection!r}: use one of {PROJECTIONS}")
        if self.overlap not in OVERLAP_MEASURES:
            raise InputError(f"unknown overlap {self.overlap!r}: use one of {OVERLAP_MEASURES}")
        names = ("iou_threshold", "min_score", "min_area_ratio", "min_likeness", "min_stability")
        for name in names:
            value = getattr(self, name)
            if not (_finite(value) and 0.0 <= value <= 1.0):
                raise InputError(f"{name}={value!r} must lie in [0, 1]")
        if not (_finite(self.box_extension) and self.box_extension >= 0):
            raise InputError(f"box_extension={self.box_extension!r} must be >= 0 (a fraction)")
        if not (_whole(self.n_positive) and _whole(self.n_negative)):
            raise InputError("n_positive and n_negative are whole numbers of points")
        if self.n_positive < 1 or self.n_negative < 0:
            raise InputError("use n_positive >= 1 and n_negative >= 0 points")
        bounds = self.bounds
        if bounds is not None and not (
            isinstance(bounds, tuple | list) and len(bounds) == 2 and all(map(_whole, bounds))
        ):
            raise InputError(f"bounds={bounds!r} must be (first, last): two slice numbers")
        steps = self.refine_steps
        if steps is not None and (not isinstance(steps, int) or steps < 0):
            raise InputError(f"refine_steps={self.refine_steps!r} must be 0 or more")
        if self.max_slices is not None and not (_whole(self.max_slices) and self.max_slices >= 0):
            raise InputError(f"max_slices={self.max_slices!r} must be a whole number >= 0, or None")
        step = self.slice_step
        if not _whole(step) or step < 1:
            raise InputError(f"slice_step={step!r} must be a whole number of slices, 1 or more")


def _finite(value: object) -> bool:
    """A finite real number (not a bool, not text)."""
    real = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    return real and math.isfinite(value)


def _whole(value: object) -> bool:
    """An int (numpy's too), not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


@dataclass
class SliceRecord:
    """One slice the model answered (or a seed: direction 0, score and overlap NaN).

    overlap: IoU (or containment) with the slice it was derived from; likeness: see
    ``PropagationOptions.min_likeness`` (NaN when not measured) and what it was measured
    on (``likeness_from``).
    """

    index: int
    seed: int
    direction: int
    score: float
    overlap: float
    area: int
    stability: float = math.nan
    likeness: float = math.nan
    likeness_from: str = ""  # "intensity" or "features" (LikenessReference.source)


@dataclass
class DirectionStop:
    """Where and why one direction from one seed ended.

    last_index: the last slice kept in that direction (the seed if none);
    rejected: the slice that tripped a rule (not kept), None for limits.
    """

    seed: int
    direction: int
    last_index: int
    reason: str
    rejected: SliceRecord | None = None


@dataclass
class PropagationResult:
    """mask: ``(n_slices, rows, cols)`` bool; records: kept slices (seeds included)
    by index; stops: one per seed and direction; requested: slices asked of the
    model, in order; filled: slices interpolated between two kept ones (``slice_step``
    > 1), ascending."""

    mask: np.ndarray
    records: list[SliceRecord]
    stops: list[DirectionStop]
    requested: list[int]
    filled: list[int] = field(default_factory=list)

    @property
    def kept_slices(self) -> list[int]:
        """Indices of the non-empty slices of ``mask``."""
        return [r.index for r in self.records]


@dataclass
class _Front:
    """One seed walking in one direction; ``last`` is its last kept slice, ``stride``
    the slices to its next one (set by the schedule)."""

    seed: int
    direction: int
    last: int
    toward_seed: bool
    stride: int = 1
    fallback: DirectionStop | None = None  # a rejected jump's stop: step 1 from here on
    logits: np.ndarray | None = None
    areas: list[int] = field(default_factory=list)
    stop: DirectionStop | None = None
    reference: LikenessReference | None = None  # what the seed held and what surrounded it

    @property
    def next(self) -> int:
        return self.last + self.direction * self.stride

    def key(self) -> tuple[int, int]:
        return abs(self.next - self.seed), self.next


class _Schedule:
    """Which front moves next: nearest first, never onto a taken slice. ``allowed``:
    ``(n_slices, rows, cols)`` bool, where a mask may lie (None: anywhere); ``step``:
    the slices a front jumps (``PropagationOptions.slice_step``); ``gaps``: the
    ``(kept, kept)`` slice pairs more than one apart, to fill."""

    def __init__(
        self,
        seeds: list[int],
        n_slices: int,
        bounds: tuple[int, int],
        max_slices: int | None,
        allowed: np.ndarray | None = None,
        step: int = 1,
    ) -> None:
        self.n_slices, self.bounds, self.max_slices = n_slices, bounds, max_slices
        self.allowed, self.step = allowed, int(step)
        self.gaps: list[tuple[int, int]] = []
        self.taken = np.zeros(n_slices, bool)
        self.taken[seeds] = True
        self.requested: list[int] = []
        self.fronts = [
            _Front(s, d, s, toward_seed=any((t - s) * d > 0 for t in seeds))
            for s in seeds
            for d in (-1, 1)
        ]

    def active(self) -> list[_Front]:
        return [f for f in self.fronts if f.stop is None]

    def next_front(self) -> _Front | None:
        """The front to advance now, after stopping those that cannot move."""
        for front in self.active():
            backing = front.fallback is not None  # asking a rejected jump's slices one by one
            front.stride = 1 if backing else self._stride(front.last, front.direction, self.taken)
            reason = self._blocked(front.next)
            rejected = front.fallback.rejected if backing else None  # None: out of the ROI
            if reason == "met" and rejected is not None and front.next == rejected.index:
                front.stop = replace(front.fallback, last_index=front.last)
            elif reason is not None:
                front.stop = DirectionStop(front.seed, front.direction, front.last, reason)
        active = self.active()
        return min(active, key=_Front.key) if active else None

    def take(self, index: int) -> None:
        self.taken[index] = True
        self.requested.append(index)

    def remaining(self) -> int:
        """Slices the active fronts could still reach: an upper estimate at step 1; with a
        slice step, the slices a rejected jump sends a front back to are not foreseen."""
        first, last = self.bounds
        reach = self.taken.copy()
        count = 0
        for front in self.active():
            z = front.last + front.direction * self._stride(front.last, front.direction, reach)
            while first <= z <= last and not reach[z]:
                reach[z] = True
                count += 1
                z += front.direction * self._stride(z, front.direction, reach)
        if self.max_slices is not None:
            count = min(count, self.max_slices - len(self.requested))
        return count

    def _stride(self, last: int, direction: int, taken: np.ndarray) -> int:
        """Slices to jump from ``last``: ``step``, or fewer to stop at the last free slice
        before the bounds or a ``taken`` one (1 where there is none: then blocked)."""
        first, end = self.bounds
        for k in range(1, self.step + 1):
            z = last + direction * k
            if not first <= z <= end or taken[z]:
                return max(k - 1, 1)
        return self.step

    def _blocked(self, index: int) -> str | None:
        if not 0 <= index < self.n_slices:
            return "volume_end"
        if not self.bounds[0] <= index <= self.bounds[1]:
            return "bounds"
        if self.taken[index]:
            return "met"
        if self.max_slices is not None and len(self.requested) >= self.max_slices:
            return "max_slices"
        return None


def propagate(
    segmenter: SliceSegmenter,
    seeds: Mapping[int, np.ndarray],
    options: PropagationOptions | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    seed_logits: Mapping[int, np.ndarray] | None = None,
    allowed: np.ndarray | None = None,
    images: Callable[[int], np.ndarray] | None = None,
    features: Features | None = None,
) -> PropagationResult:
    """Grow seed masks ``{slice index: (rows, cols) mask}`` into a 3D mask.

    Each direction from each seed goes on until a stop rule fires, or it reaches
    the volume's end, the bounds, or a slice already taken (another seed or the
    front coming the other way). ``progress(done, total)`` is called after each
    model call (``total`` is an estimate that shrinks as directions stop).
    ``cancel`` (a callable returning True, or a threading.Event) is checked
    before each call; then CancelledError is raised and nothing is returned.
    ``seed_logits`` ``{slice index: the model's low-res logits}`` for seeds the
    model drew (an interactive session has them) are used as the first mask
    input from those seeds. The seeds are copied, never modified.
    ``allowed`` ``(n_slices, rows, cols)`` bool (a 3D ROI's voxels in slice order): each
    new mask is clipped to it, and each carried box is cut to its footprint on the
    next slice (the box of its pixels there). ``images(index)`` gives slice ``index``
    as the model sees it, ``(rows, cols)`` float in 0..1 (windowed), for the likeness
    rule (off without it); ``features(index, masks)`` the slice's mean image embedding
    under each mask (``SegmentationSession.mask_features``), for the likeness rule on a
    seed too faint against its ring to judge by intensity (``seed_reference``).
    """
    options = options or PropagationOptions()
    options.validate()
    n_slices = int(segmenter.n_slices)
    bounds = _resolve_bounds(options.bounds, n_slices)
    masks = _check_seeds(seeds, n_slices, bounds)
    shape = next(iter(masks.values())).shape
    volume = np.zeros((n_slices, *shape), bool)
    for index, mask in masks.items():
        volume[index] = mask
    if allowed is not None and np.shape(allowed) != volume.shape:
        raise InputError(f"allowed region {np.shape(allowed)} is not the volume {volume.shape}")
    schedule = _Schedule(
        sorted(masks), n_slices, bounds, options.max_slices, allowed, options.slice_step
    )
    logits = _check_seed_logits(seed_logits, masks)
    for front in schedule.fronts:
        front.areas.append(int(masks[front.seed].sum()))
        front.logits = logits.get(front.seed)
        if images is not None and options.min_likeness > 0:
            front.reference = seed_reference(front.seed, masks[front.seed], images, features)
    records = [SliceRecord(z, z, 0, math.nan, math.nan, int(m.sum())) for z, m in masks.items()]
    is_cancelled = cancel_check(cancel)
    if progress is not None:
        progress(0, schedule.remaining())
    while (front := schedule.next_front()) is not None:
        if is_cancelled():
            raise CancelledError("propagation cancelled; no mask was changed")
        record = _advance(segmenter, front, schedule, volume, options, images, features)
        if record is not None:
            records.append(record)
        if progress is not None:
            done = len(schedule.requested)
            progress(done, done + schedule.remaining())
    stops = [f.stop for f in schedule.fronts if f.stop is not None]
    for stop in stops:
        logger.info("seed %d direction %+d stopped after slice %d: %s", *_stop_fields(stop))
    records.sort(key=lambda r: r.index)
    filled = []
    for low, high in schedule.gaps:
        filled += fill_between(volume, low, high, allowed)
    requested = list(schedule.requested)
    return PropagationResult(volume, records, stops, requested, sorted(filled))


def plan_order(
    seeds: Iterable[int],
    n_slices: int,
    bounds: tuple[int, int] | None = None,
    max_slices: int | None = None,
    step: int = 1,
) -> list[int]:
    """Slices :func:`propagate` asks for, in its order, if no direction stops early:
    nearest a seed first, outward, every ``step``-th slice (``slice_step``); within
    ``bounds``; seeds excluded. Use it to encode slices ahead of propagation."""
    resolved = _resolve_bounds(bounds, n_slices)
    indices = sorted({_check_index(z, n_slices, resolved) for z in seeds})
    if not indices:
        raise InputError("give at least one seed slice")
    schedule = _Schedule(indices, n_slices, resolved, max_slices, step=step)
    while (front := schedule.next_front()) is not None:
        schedule.take(front.next)
        front.last = front.next
    return schedule.requested


def project_prompt(
    mask: np.ndarray, options: PropagationOptions, logits: np.ndarray | None = None
) -> SlicePrompt:
    """The prompt for a neighbouring slice from ``mask`` ``(rows, cols)`` on this one.

    ``logits`` (the model's low-res output for ``mask``) is the mask input when
    the projection uses one; without it there is no mask input (SAM-type
    decoders are trained to take back their own logits, not a converted mask).
    """
    mode = options.projection
    points = np.zeros((0, 2), np.float32)
    labels = np.zeros(0, np.int64)
    if mode in ("points", "points_and_mask"):
        positive = interior_points(mask, options.n_positive)
        negative = exterior_points(mask, options.n_negative)
        points = np.concatenate([positive, negative])
        labels = np.array([1] * len(positive) + [0] * len(negative), np.int64)
    elif mode == "single_point":
        points, labels = interior_points(mask, 1), np.ones(1, np.int64)
    box = mask_box(mask, options.box_extension) if mode in ("mask", "box") else None
    mask_input = None
    if mode in ("mask", "points_and_mask"):
        mask_input = logits
    return SlicePrompt(points, labels, box, mask_input)


def cut_box(box: np.ndarray, allowed: np.ndarray) -> np.ndarray | None:
    """``box`` ``(x0, y0, x1, y1)`` cut to the bounding box of ``allowed`` ``(rows, cols)``;
    None when they do not overlap (or nothing is allowed)."""
    if not allowed.any():
        return None
    footprint = mask_box(allowed)
    low = np.maximum(box[:2], footprint[:2])
    high = np.minimum(box[2:], footprint[2:])
    if (high < low).any():
        return None
    return np.concatenate([low, high]).astype(np.float32)


def _advance(
    segmenter: SliceSegmenter,
    front: _Front,
    schedule: _Schedule,
    volume: np.ndarray,
    options: PropagationOptions,
    images: Callable[[int], np.ndarray] | None = None,
    features: Features | None = None,
) -> SliceRecord | None:
    """Ask the model for ``front.next``; keep it or stop the front. Returns the kept record."""
    index = front.next
    source, logits = _prompt_source(front, schedule, volume, options)
    prompt = project_prompt(source, options, logits)
    if schedule.allowed is not None and prompt.box is not None:
        prompt.box = cut_box(prompt.box, schedule.allowed[index])
        if prompt.box is None:  # not asked, not taken: a jump comes back to it
            _reject(front, DirectionStop(front.seed, front.direction, front.last, "roi"))
            return None
    schedule.take(index)
    prediction = segmenter.segment_slice(index, prompt)
    if options.refine_steps and prompt.box is not None:
        allowed = None if schedule.allowed is None else schedule.allowed[index]
        prediction = refine(segmenter, index, prompt, prediction, options, allowed)
    mask = np.asarray(prediction.mask, bool)
    if mask.shape != volume.shape[1:]:
        raise InputError(
            f"the model's slice {index} is {mask.shape} but the seeds are {volume.shape[1:]}: "
            "draw seeds on slices along the propagation axis"
        )
    if schedule.allowed is not None:
        mask = mask & schedule.allowed[index]
    previous = volume[front.last]
    record = SliceRecord(
        index,
        front.seed,
        front.direction,
        float(prediction.score),
        _overlap(previous, mask, options.overlap),
        int(mask.sum()),
        float(getattr(prediction, "stability", math.nan)),
    )
    if front.reference is not None and images is not None and record.area:
        record.likeness = front.reference.likeness(index, mask, images, features)
        record.likeness_from = front.reference.source
    reason = _stop_reason(record, front, options)
    logger.debug(
        "slice %d: score %.3f overlap %.3f area %d",
        index,
        record.score,
        record.overlap,
        record.area,
    )
    if reason is not None:
        _reject(front, DirectionStop(front.seed, front.direction, front.last, reason, record))
        return None
    volume[index] = mask
    if abs(index - front.last) > 1:
        schedule.gaps.append((min(index, front.last), max(index, front.last)))
    front.last = index
    front.logits = np.asarray(prediction.low_res_logits, np.float32)
    front.areas = [*front.areas[-1:], record.area]
    return record


def _reject(front: _Front, stop: DirectionStop) -> None:
    """End ``front`` at ``stop``; after a jump, first ask the slices it skipped one at a
    time (``front.fallback``)."""
    if front.stride > 1:
        front.fallback = stop
    else:
        front.stop = stop


def fill_between(
    volume: np.ndarray, low: int, high: int, allowed: np.ndarray | None = None
) -> list[int]:
    """Fill slices ``low + 1 .. high - 1`` of ``volume`` ``(n_slices, rows, cols)`` bool
    from its masks on ``low`` and ``high``: the signed distance maps of the two (scipy's
    Euclidean distance transform, in pixels; negative inside) blended linearly by
    distance along the axis, negative kept; clipped to ``allowed``. A shape that grows,
    shrinks or moves less than its size between the two passes smoothly from one to
    the other. Returns the slices written, an empty one too (two masks that do not meet
    leave nothing between them), so that a caller copying them clears what was there."""
    near, far = _signed_distance(volume[low]), _signed_distance(volume[high])
    filled = list(range(low + 1, high))
    for index in filled:
        weight = (index - low) / (high - low)
        mask = (1.0 - weight) * near + weight * far < 0
        if allowed is not None:
            mask &= allowed[index]
        volume[index] = mask
    return filled


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    """``(rows, cols)`` float: distance to the nearest pixel outside ``mask`` (negated)
    inside it, to the nearest pixel inside it outside it (pixels)."""
    padded = np.pad(np.asarray(mask, bool), 1)  # an outside even for a full slice
    inside = ndimage.distance_transform_edt(padded)
    outside = ndimage.distance_transform_edt(~padded) if padded.any() else np.inf
    return (outside - inside)[1:-1, 1:-1]


def refine(
    segmenter: SliceSegmenter,
    index: int,
    prompt: SlicePrompt,
    prediction,
    options: PropagationOptions,
    allowed: np.ndarray | None = None,
):
    """Ask slice ``index`` again with the box of the model's own mask (+``box_extension``,
    cut to ``allowed``'s footprint), at most ``options.refine_steps`` times, until that
    box has an IoU of ``REFINE_SAME_BOX`` with the one before; an empty answer ends it
    (the last non-empty prediction is returned). Mask inputs are not carried."""

    def own_box(mask: np.ndarray, box: np.ndarray) -> np.ndarray | None:
        mask = np.asarray(mask, bool)
        if allowed is not None:
            mask = mask & allowed
        if not mask.any():
            return None
        again = mask_box(mask, options.box_extension)
        if allowed is not None:
            again = cut_box(again, allowed)
        return None if again is None or box_iou(again, box) >= REFINE_SAME_BOX else again

    steps = options.refine_steps or 0
    return ask_again(segmenter, index, prompt, prediction, prompt.box, steps, own_box)


def ask_again(
    segmenter: SliceSegmenter,
    index: int,
    prompt: SlicePrompt,
    prediction: Prediction,
    box: np.ndarray,
    steps: int,
    next_box: Callable[[np.ndarray, np.ndarray], np.ndarray | None],
    asked: list[list[float]] | None = None,
) -> Prediction:
    """Ask slice ``index`` again, at most ``steps`` times, with the box
    ``next_box(mask, box)`` makes from the model's last mask and the box asked before
    (None: settled). An empty mask ends it; an empty answer keeps the one before. The
    boxes asked are appended to ``asked`` (if given)."""
    for _ in range(steps):
        if not np.asarray(prediction.mask, bool).any():
            break
        again = next_box(prediction.mask, box)
        if again is None:
            break
        answer = segmenter.segment_slice(index, SlicePrompt(prompt.points, prompt.labels, again))
        if not np.asarray(answer.mask, bool).any():
            break
        prediction, box = answer, again
        if asked is not None:
            asked.append([round(float(v), 1) for v in again])
    return prediction


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two inclusive-corner boxes ``(x0, y0, x1, y1)`` (pixel counts)."""
    low, high = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = float(np.prod(np.clip(high - low + 1, 0, None)))
    area = float(np.prod(a[2:] - a[:2] + 1) + np.prod(b[2:] - b[:2] + 1))
    return inter / (area - inter) if area > inter else 0.0


def _prompt_source(
    front: _Front, schedule: _Schedule, volume: np.ndarray, options: PropagationOptions
) -> tuple[np.ndarray, np.ndarray | None]:
    """Mask (and logits, when the projection uses them) to prompt ``front.next``
    from: the front's last slice, united with the slice beyond when that is kept."""
    source = volume[front.last]
    logits = [_logits_of(front.last, schedule)]
    beyond = front.next + front.direction
    if 0 <= beyond < len(volume) and volume[beyond].any():
        source = source | volume[beyond]
        logits.append(_logits_of(beyond, schedule))
    known = [item for item in logits if item is not None]
    if options.projection not in ("mask", "points_and_mask") or not known:
        return source, None
    return source, np.maximum.reduce(known) if len(known) > 1 else known[0]


def _logits_of(index: int, schedule: _Schedule) -> np.ndarray | None:
    """The model's logits for kept slice ``index`` when a front holds them."""
    for front in schedule.fronts:
        if front.last == index and front.logits is not None:
            return front.logits
    return None


def _stop_reason(record: SliceRecord, front: _Front, options: PropagationOptions) -> str | None:
    """The first stop rule ``record`` trips, or None to keep the slice."""
    if record.area == 0:
        return "empty"
    if front.toward_seed and not options.stop_between_seeds:
        return None
    if options.min_score > 0 and record.score < options.min_score:
        return "score"
    if record.overlap < options.iou_threshold:
        return "overlap"
    if options.min_likeness > 0 and record.likeness < options.min_likeness:
        return "likeness"
    if record.stability < options.min_stability:  # NaN (not measured) never stops
        return "stability"
    if options.min_area_ratio > 0 and record.area * options.min_area_ratio > max(front.areas):
        return "area"
    return None


@dataclass(frozen=True)
class LikenessReference:
    """What a seed mask held and what surrounded it (its ring, ``ring_around``): mean
    intensities of the windowed slice (``source`` ``"intensity"``), or, where those
    differ by less than ``MIN_CONTRAST``, the image embedding's means under each
    (``"features"``, see ``SegmentationSession.mask_features``)."""

    source: str
    held: np.ndarray
    around: np.ndarray

    def likeness(
        self,
        index: int,
        mask: np.ndarray,
        images: Callable[[int], np.ndarray],
        features: Features | None,
    ) -> float:
        """Where ``mask``'s mean on slice ``index`` lies on the line from the seed's ring
        (0) to what the seed held (1): in the intensities of ``images(index)``, or in the
        embedding that ``features`` gives (only the one this reference measures is read)."""
        mask = np.asarray(mask, bool)
        if self.source == "intensity":
            value = np.array([np.asarray(images(index), np.float32)[mask].mean()])
        elif features is None:
            raise ValueError("a likeness on the image embedding needs the slice's features")
        else:
            value = np.asarray(features(index, [mask])[0], np.float64)
        axis = self.held - self.around
        return float((value - self.around) @ axis / (axis @ axis))


def seed_reference(
    index: int,
    mask: np.ndarray,
    images: Callable[[int], np.ndarray],
    features: Features | None = None,
) -> LikenessReference | None:
    """The likeness rule's reference for a seed ``mask`` on slice ``index``: its contrast
    with its ring in ``images(index)`` (0..1; :func:`mask_prompts.intensity_contrast`)
    when at least ``MIN_CONTRAST``; else, with ``features`` (a slice's mean embedding
    under given masks), the embedding's contrast when their cosine distance is at least
    ``MIN_FEATURE_CONTRAST``; else None (nothing to judge by)."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return None
    ring = ring_around(mask)  # a distance transform: once, for both contrasts
    held, around = intensity_contrast(images(index), mask, ring)
    if abs(held - around) >= MIN_CONTRAST:
        return LikenessReference("intensity", np.array([held]), np.array([around]))
    if features is None or not ring.any():
        return None
    held_f, around_f = np.asarray(features(index, [mask, ring]), np.float64)
    norms = np.linalg.norm(held_f) * np.linalg.norm(around_f)
    if (
        not np.isfinite(norms)
        or norms == 0
        or 1 - float(held_f @ around_f) / norms < MIN_FEATURE_CONTRAST
    ):
        return None
    return LikenessReference("features", held_f, around_f)


def _overlap(a: np.ndarray, b: np.ndarray, measure: str) -> float:
    """IoU, or intersection over the smaller mask (``"containment"``); 0 if one is empty."""
    intersection = int(np.count_nonzero(a & b))
    if measure == "iou":
        denominator = int(np.count_nonzero(a | b))
    else:
        denominator = min(int(np.count_nonzero(a)), int(np.count_nonzero(b)))
    return intersection / denominator if denominator else 0.0


def _resolve_bounds(bounds: tuple[int, int] | None, n_slices: int) -> tuple[int, int]:
    if n_slices < 1:
        raise InputError("the volume has no slices along the propagation axis")
    if bounds is None:
        return 0, n_slices - 1
    first, last = (int(b) for b in bounds)
    if not 0 <= first <= last < n_slices:
        raise InputError(
            f"bounds {tuple(bounds)} must be (first, last), 0 <= first <= last <= {n_slices - 1}"
        )
    return first, last


def _check_index(index: int, n_slices: int, bounds: tuple[int, int]) -> int:
    if not isinstance(index, int | np.integer) or not 0 <= index < n_slices:
        raise InputError(f"seed slice {index!r} is not a slice index in 0..{n_slices - 1}")
    if not bounds[0] <= index <= bounds[1]:
        raise InputError(f"seed slice {index} lies outside the bounds {bounds}: widen the bounds")
    return int(index)


def _check_seeds(
    seeds: Mapping[int, np.ndarray], n_slices: int, bounds: tuple[int, int]
) -> dict[int, np.ndarray]:
    """Validated bool copies of the seed masks, all of one 2D shape, none empty."""
    if not isinstance(seeds, Mapping):
        raise InputError(
            f"seeds must map slice indices to masks, e.g. {{k: mask}}, not a {type(seeds).__name__}"
        )
    if not seeds:
        raise InputError("give at least one seed slice with a mask to propagate from")
    masks: dict[int, np.ndarray] = {}
    for index, mask in seeds.items():
        z = _check_index(index, n_slices, bounds)
        array = np.array(mask, dtype=bool, copy=True)
        if array.ndim != 2:
            raise InputError(
                f"seed mask on slice {z} has shape {array.shape}: give a 2D slice mask"
            )
        if not array.any():
            raise InputError(
                f"seed mask on slice {z} is empty: draw the object or leave the slice out"
            )
        masks[z] = array
    shapes = {m.shape for m in masks.values()}
    if len(shapes) > 1:
        raise InputError(
            f"seed masks differ in shape {sorted(shapes)}: all must be slices of one axis"
        )
    return masks


def _check_seed_logits(
    seed_logits: Mapping[int, np.ndarray] | None, masks: dict[int, np.ndarray]
) -> dict[int, np.ndarray]:
    """Float32 copies of the seeds' logits; each must belong to a seed."""
    logits = {}
    for index, value in (seed_logits or {}).items():
        if index not in masks:
            raise InputError(f"seed_logits for slice {index}, which has no seed mask")
        logits[int(index)] = np.array(value, dtype=np.float32, copy=True)
    return logits


def _stop_fields(stop: DirectionStop) -> tuple[int, int, int, str]:
    return stop.seed, stop.direction, stop.last_index, stop.reason
