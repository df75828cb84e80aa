"""3D propagation of slice masks, against phantoms with known masks.

The model is replaced by ``OracleThresholdSegmenter``: it thresholds the phantom
slice and keeps the connected components the prompt hits, so the result depends
on the prompts propagation derives (it never sees the true mask).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest
from scipy import ndimage

from RobustMedSAMLib.datasets import phantoms
from RobustMedSAMLib.errors import CancelledError, InputError
from RobustMedSAMLib.inference.mask_prompts import (
    exterior_points,
    interior_points,
    logits_to_mask,
    mask_box,
    mask_to_logits,
)
from RobustMedSAMLib.inference.propagation import (
    PROJECTIONS,
    PropagationOptions,
    plan_order,
    project_prompt,
    propagate,
)
from RobustMedSAMLib.inference.types import Prediction, SlicePrompt

THRESHOLD_HU = 80.0  # halfway between the phantoms' 40 HU background and 120 HU objects


class OracleThresholdSegmenter:
    """Deterministic stand-in for the model on a phantom image ``(K, J, I)``.

    Slice ``index``: Gaussian-smooth (sigma 1 px), threshold, label connected
    components; keep those hit by a positive point, covering >= half their area
    inside the box or inside the mask input (logits > 0); drop those under a
    negative point; clip to the box. Records every slice asked in ``requested``.
    """

    def __init__(
        self,
        image: np.ndarray,
        threshold: float = THRESHOLD_HU,
        score: Callable[[int, np.ndarray], float] | None = None,
    ) -> None:
        self.image = image
        self.threshold = threshold
        self.score = score or (lambda index, mask: 0.95 if mask.any() else 0.1)
        self.requested: list[int] = []
        self.prompts: list[SlicePrompt] = []

    @property
    def n_slices(self) -> int:
        return self.image.shape[0]

    def segment_slice(self, index: int, prompt: SlicePrompt) -> Prediction:
        self.requested.append(index)
        self.prompts.append(prompt)
        smooth = ndimage.gaussian_filter(self.image[index].astype(np.float32), 1.0)
        components, count = ndimage.label(smooth > self.threshold)
        ids = np.arange(1, count + 1)
        areas = ndimage.sum_labels(np.ones_like(components), components, ids)
        hit = np.zeros(count + 1, bool)
        box_region = None
        if prompt.box is not None:
            x0, y0, x1, y1 = np.rint(prompt.box).astype(int)
            box_region = np.zeros(components.shape, bool)
            box_region[y0 : y1 + 1, x0 : x1 + 1] = True
            hit[1:] |= ndimage.sum_labels(box_region, components, ids) >= 0.5 * areas
        if prompt.mask_input is not None:
            region = logits_to_mask(prompt.mask_input, components.shape)
            hit[1:] |= ndimage.sum_labels(region, components, ids) >= 0.5 * areas
        for (x, y), label in zip(prompt.points, prompt.labels, strict=True):
            component = components[int(round(y)), int(round(x))]
            if component:
                hit[component] = bool(label)
        hit[0] = False
        mask = hit[components]
        if box_region is not None:
            mask &= box_region
        return Prediction(mask, self.score(index, mask), mask_to_logits(mask))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def central_seed(truth: np.ndarray) -> dict[int, np.ndarray]:
    """The true mask on the middle slice of the object, as a user would draw it."""
    slices = np.flatnonzero(truth.any(axis=(1, 2)))
    middle = int(slices[len(slices) // 2])
    return {middle: truth[middle].copy()}


def object_range(truth: np.ndarray) -> tuple[int, int]:
    slices = np.flatnonzero(truth.any(axis=(1, 2)))
    return int(slices[0]), int(slices[-1])


def image_from_labels(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """CT-like int16 image: 40 HU background, 120 HU objects, 12 HU noise."""
    rng = np.random.default_rng(seed)
    image = np.where(labels, 120.0, 40.0) + rng.normal(0, 12, labels.shape)
    return image.astype(np.int16)


def discs(centres: list[tuple[float, float]], radii: list[float], size: int = 64) -> np.ndarray:
    """Labels ``(len(centres), size, size)``: one disc per slice, at (x, y) with a radius."""
    y, x = np.mgrid[:size, :size]
    return np.stack(
        [(x - cx) ** 2 + (y - cy) ** 2 <= r**2 for (cx, cy), r in zip(centres, radii, strict=True)]
    )


PHANTOMS = {
    "sphere": lambda: phantoms.sphere(),
    "ellipsoid": lambda: phantoms.ellipsoid(rotation_deg=(20.0, 0.0, 30.0)),
    "tube": lambda: phantoms.tube(),
    "liver": lambda: phantoms.organ_scene(target="liver"),
    "spleen": lambda: phantoms.organ_scene(target="spleen"),
}


def other_organs(phantom: phantoms.Phantom) -> np.ndarray:
    """Voxels of objects other than the target (the body and the liver's lesion aside)."""
    target = np.unique(phantom.labels[phantom.mask])
    skip = [v for v, n in phantom.label_names.items() if n in ("body", "lesion")]
    return (phantom.labels > 0) & ~np.isin(phantom.labels, [*target, *skip])


@pytest.fixture(scope="module")
def phantom_cache() -> dict[str, phantoms.Phantom]:
    return {name: make() for name, make in PHANTOMS.items()}


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("name", list(PHANTOMS))
def test_central_seed_recovers_object(phantom_cache, name: str, projection: str) -> None:
    phantom = phantom_cache[name]
    segmenter = OracleThresholdSegmenter(phantom.image)
    result = propagate(
        segmenter, central_seed(phantom.mask), PropagationOptions(projection=projection)
    )
    assert dice(result.mask, phantom.mask) >= 0.9
    assert not (result.mask & other_organs(phantom)).any()
    first, last = object_range(phantom.mask)
    assert min(segmenter.requested) >= first - 1 and max(segmenter.requested) <= last + 1
    assert len(set(segmenter.requested)) == len(segmenter.requested)
    assert result.requested == segmenter.requested
    assert all(r.area > 0 for r in result.records)


def test_default_overlap_keeps_what_micro_sams_iou_rule_cuts(phantom_cache) -> None:
    """IoU >= 0.8 (micro-sam) cuts a sphere's caps and stops at once on a thin
    vessel whose model mask is a pixel wider than the seed; containment does not."""
    sphere = phantom_cache["sphere"]
    by_iou = propagate(
        OracleThresholdSegmenter(sphere.image),
        central_seed(sphere.mask),
        PropagationOptions(overlap="iou", iou_threshold=0.8),
    )
    by_default = propagate(OracleThresholdSegmenter(sphere.image), central_seed(sphere.mask))
    assert {s.reason for s in by_iou.stops} == {"overlap"}
    assert dice(by_default.mask, sphere.mask) > dice(by_iou.mask, sphere.mask) + 0.02

    scene = phantoms.organ_scene(target="aorta")
    seeds = central_seed(scene.mask)
    by_iou = propagate(
        OracleThresholdSegmenter(scene.image),
        seeds,
        PropagationOptions(overlap="iou", iou_threshold=0.8),
    )
    by_default = propagate(OracleThresholdSegmenter(scene.image), seeds)
    assert len(by_iou.requested) == 2 and by_iou.kept_slices == list(seeds)
    first, last = object_range(scene.mask)
    assert by_default.kept_slices == list(range(first, last + 1))


def test_box_extension_lets_a_growing_object_grow(phantom_cache) -> None:
    """From a small slice near a pole towards the equator the object grows; a
    tight box (extension 0) clips every slice to the seed's box."""
    phantom = phantom_cache["sphere"]
    seeds = {16: phantom.mask[16].copy()}
    region = slice(16, 33)
    scores = {}
    for extension in (0.0, 0.1):
        options = PropagationOptions(projection="box", box_extension=extension, bounds=(16, 32))
        result = propagate(OracleThresholdSegmenter(phantom.image), seeds, options)
        scores[extension] = dice(result.mask[region], phantom.mask[region])
    assert scores[0.1] >= 0.95 > 0.8 > scores[0.0]


def test_tube_stops_at_its_ends_on_empty_slices(phantom_cache) -> None:
    phantom = phantom_cache["tube"]
    segmenter = OracleThresholdSegmenter(phantom.image)
    result = propagate(segmenter, central_seed(phantom.mask))
    first, last = object_range(phantom.mask)
    assert sorted(segmenter.requested)[0] == first - 1 and max(segmenter.requested) == last + 1
    assert sorted((s.direction, s.reason, s.last_index) for s in result.stops) == [
        (-1, "empty", first),
        (1, "empty", last),
    ]
    assert not result.mask[:first].any() and not result.mask[last + 1 :].any()


def test_two_seeds_meet_in_the_middle(phantom_cache) -> None:
    phantom = phantom_cache["tube"]
    segmenter = OracleThresholdSegmenter(phantom.image)
    seeds = {20: phantom.mask[20].copy(), 41: phantom.mask[41].copy()}
    result = propagate(segmenter, seeds)
    assert len(set(segmenter.requested)) == len(segmenter.requested)
    assert set(range(21, 41)) <= set(segmenter.requested)
    gap = slice(21, 41)
    assert dice(result.mask[gap], phantom.mask[gap]) >= 0.95
    inner = [s for s in result.stops if (s.seed, s.direction) in ((20, 1), (41, -1))]
    assert [s.reason for s in inner] == ["met", "met"]
    assert {s.last_index for s in inner} == {30, 31}  # each front filled its half
    assert dice(result.mask, phantom.mask) >= 0.9


def test_single_slice_between_seeds_is_prompted_from_both(phantom_cache) -> None:
    phantom = phantom_cache["tube"]
    segmenter = OracleThresholdSegmenter(phantom.image)
    seeds = {30: phantom.mask[30].copy(), 32: phantom.mask[32].copy()}
    result = propagate(segmenter, seeds, PropagationOptions(projection="box", box_extension=0))
    assert segmenter.requested.count(31) == 1
    box = segmenter.prompts[segmenter.requested.index(31)].box
    assert np.array_equal(box, mask_box(seeds[30] | seeds[32]))
    assert dice(result.mask[31], phantom.mask[31]) >= 0.95


def test_plan_order_is_the_order_propagation_asks(phantom_cache) -> None:
    phantom = phantom_cache["tube"]
    first, last = object_range(phantom.mask)
    bounds = (first + 3, last - 3)
    seeds = {25: phantom.mask[25].copy(), 40: phantom.mask[40].copy()}
    segmenter = OracleThresholdSegmenter(phantom.image)
    result = propagate(segmenter, seeds, PropagationOptions(bounds=bounds))
    planned = plan_order(seeds, segmenter.n_slices, bounds)
    assert segmenter.requested == planned
    assert planned[:4] == [24, 26, 39, 41]  # nearest first, then by index
    assert sorted(planned) == [z for z in range(bounds[0], bounds[1] + 1) if z not in seeds]
    assert {s.reason for s in result.stops} == {"bounds", "met"}


def test_bounds_are_honoured(phantom_cache) -> None:
    phantom = phantom_cache["sphere"]
    segmenter = OracleThresholdSegmenter(phantom.image)
    result = propagate(segmenter, {32: phantom.mask[32]}, PropagationOptions(bounds=(29, 34)))
    assert set(segmenter.requested) == {29, 30, 31, 33, 34}
    assert not result.mask[:29].any() and not result.mask[35:].any()
    assert result.mask[29:35].all(axis=0).any()


def test_max_slices_limits_model_calls(phantom_cache) -> None:
    phantom = phantom_cache["tube"]
    segmenter = OracleThresholdSegmenter(phantom.image)
    result = propagate(segmenter, {32: phantom.mask[32]}, PropagationOptions(max_slices=6))
    assert segmenter.requested == [31, 33, 30, 34, 29, 35]
    assert {s.reason for s in result.stops} == {"max_slices"}


def test_overlap_rule_stops_at_an_abrupt_jump() -> None:
    centres = [(32.0, 32.0)] * 40 + [(40.0, 32.0)] * 24  # shifts 8 px at slice 40
    labels = discs(centres, [10.0] * 64)
    segmenter = OracleThresholdSegmenter(image_from_labels(labels))
    result = propagate(
        segmenter, {30: labels[30]}, PropagationOptions(projection="points", iou_threshold=0.8)
    )
    up = next(s for s in result.stops if s.direction == 1)
    assert (up.reason, up.last_index, up.rejected.index) == ("overlap", 39, 40)
    assert up.rejected.overlap < 0.8
    assert result.mask[:40].any(axis=(1, 2)).all() and not result.mask[40:].any()
    assert max(segmenter.requested) == 40


def test_score_rule_stops_where_the_model_is_unsure() -> None:
    labels = discs([(32.0, 32.0)] * 64, [10.0] * 64)
    segmenter = OracleThresholdSegmenter(
        image_from_labels(labels), score=lambda index, mask: 0.3 if index >= 45 else 0.9
    )
    result = propagate(segmenter, {30: labels[30]}, PropagationOptions(min_score=0.5))
    up = next(s for s in result.stops if s.direction == 1)
    assert (up.reason, up.last_index) == ("score", 44)
    assert not result.mask[45:].any()
    unsure = OracleThresholdSegmenter(image_from_labels(labels), score=lambda index, mask: -0.2)
    result = propagate(unsure, {30: labels[30]})  # min_score 0: the rule is off
    assert "score" not in {s.reason for s in result.stops}


def test_area_rule_stops_a_leak_that_overlap_misses() -> None:
    radii = [6.0] * 40 + [14.0] * 24  # concentric: containment stays 1
    labels = discs([(32.0, 32.0)] * 64, radii)
    segmenter = OracleThresholdSegmenter(image_from_labels(labels))
    options = PropagationOptions(overlap="containment", box_extension=1.0, min_area_ratio=0.5)
    result = propagate(segmenter, {30: labels[30]}, options)
    up = next(s for s in result.stops if s.direction == 1)
    assert (up.reason, up.last_index) == ("area", 39)
    assert up.rejected.overlap == 1.0


def test_empty_slices_stop_and_never_enter_the_result() -> None:
    centres = [(32.0, 32.0)] * 64
    labels = discs(centres, [9.0] * 64)
    labels[35] = False  # the object is interrupted on one slice
    segmenter = OracleThresholdSegmenter(image_from_labels(labels))
    result = propagate(segmenter, {20: labels[20]}, PropagationOptions(overlap="containment"))
    up = next(s for s in result.stops if s.direction == 1)
    assert (up.reason, up.last_index, up.rejected.area) == ("empty", 34, 0)
    assert all(r.area > 0 for r in result.records)
    assert not result.mask[35:].any()
    assert max(segmenter.requested) == 35


def test_cancel_raises_and_leaves_seeds_untouched(phantom_cache) -> None:
    phantom = phantom_cache["sphere"]
    seeds = central_seed(phantom.mask)
    before = {z: m.copy() for z, m in seeds.items()}
    segmenter = OracleThresholdSegmenter(phantom.image)
    with pytest.raises(CancelledError):
        propagate(segmenter, seeds, cancel=lambda: len(segmenter.requested) >= 5)
    assert len(segmenter.requested) == 5
    assert all(np.array_equal(seeds[z], before[z]) for z in seeds)

    event = threading.Event()

    def stop_after_three(done: int, total: int) -> None:
        if done >= 3:
            event.set()

    with pytest.raises(CancelledError):
        propagate(segmenter, seeds, progress=stop_after_three, cancel=event)


def test_progress_counts_up_to_the_slices_asked(phantom_cache) -> None:
    phantom = phantom_cache["ellipsoid"]
    calls: list[tuple[int, int]] = []
    segmenter = OracleThresholdSegmenter(phantom.image)
    result = propagate(
        segmenter, central_seed(phantom.mask), progress=lambda d, t: calls.append((d, t))
    )
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[0] == 0
    assert done[-1] == len(result.requested) == len(segmenter.requested)
    assert all(t >= d for d, t in calls) and calls[-1][1] == calls[-1][0]


def test_bad_seeds_and_options_are_input_errors(phantom_cache) -> None:
    phantom = phantom_cache["sphere"]
    segmenter = OracleThresholdSegmenter(phantom.image)
    good = phantom.mask[32]
    cases = [
        ({}, PropagationOptions(), "at least one seed"),
        ({32: np.zeros_like(good)}, PropagationOptions(), "empty"),
        ({99: good}, PropagationOptions(), "0..63"),
        ({32: good}, PropagationOptions(bounds=(0, 10)), "outside the bounds"),
        ({32: good, 33: good[20:]}, PropagationOptions(), "differ in shape"),
        ({32: good}, PropagationOptions(projection="lasso"), "unknown projection"),
        ({32: good}, PropagationOptions(iou_threshold=1.5), "iou_threshold"),
    ]
    for seeds, options, message in cases:
        with pytest.raises(InputError, match=message):
            propagate(segmenter, seeds, options)
    assert segmenter.requested == []


@pytest.mark.parametrize("style", ["sam", "medsam"])
def test_logits_round_trip_on_a_non_square_slice(style: str) -> None:
    y, x = np.mgrid[:100, :150]
    mask = (x - 90) ** 2 + (y - 40) ** 2 <= 20**2
    logits = mask_to_logits(mask, style)
    assert logits.shape == (1, 256, 256) and logits.dtype == np.float32
    padded = (logits[0, 171:] == 0).all()  # rows below 100 * 256 / 150 are padding
    assert padded == (style == "sam")
    assert dice(logits_to_mask(logits, mask.shape, style), mask) >= 0.97
    assert dice(logits_to_mask(mask_to_logits(mask, style, 64), mask.shape, style), mask) >= 0.9


def test_mask_input_is_the_models_own_logits(phantom_cache) -> None:
    phantom = phantom_cache["tube"]
    seeds = {32: phantom.mask[32].copy()}
    segmenter = OracleThresholdSegmenter(phantom.image)
    result = propagate(segmenter, seeds, PropagationOptions(max_slices=4))
    assert segmenter.requested == [31, 33, 30, 34]
    first, later = segmenter.prompts[0], segmenter.prompts[2]
    assert first.mask_input is None and first.box is not None  # no logits for a drawn seed
    assert np.array_equal(later.mask_input, mask_to_logits(result.mask[31]))  # slice 31's
    seed_logits = {32: mask_to_logits(seeds[32])}
    segmenter = OracleThresholdSegmenter(phantom.image)
    propagate(segmenter, seeds, PropagationOptions(max_slices=2), seed_logits=seed_logits)
    assert all(np.array_equal(p.mask_input, seed_logits[32]) for p in segmenter.prompts)
    with pytest.raises(InputError, match="no seed mask"):
        propagate(segmenter, seeds, seed_logits={5: seed_logits[32]})


def test_projected_points_fall_inside_and_outside_the_mask() -> None:
    y, x = np.mgrid[:64, :64]
    mask = ((x - 20) ** 2 + (y - 30) ** 2 <= 64) | ((x - 45) ** 2 + (y - 30) ** 2 <= 81)
    positive = interior_points(mask, 3)
    negative = exterior_points(mask, 4)
    assert len(positive) == 3 and len(negative) == 4
    assert mask[positive[:, 1].astype(int), positive[:, 0].astype(int)].all()
    assert not mask[negative[:, 1].astype(int), negative[:, 0].astype(int)].any()
    assert {tuple(p) for p in positive[:2]} == {(45.0, 30.0), (20.0, 30.0)}  # both components
    single = project_prompt(mask, PropagationOptions(projection="single_point"))
    assert single.points.tolist() == [[45.0, 30.0]] and single.labels.tolist() == [1]
    options = PropagationOptions(projection="mask", box_extension=0.0)
    logits = mask_to_logits(mask)
    assert project_prompt(mask, options).mask_input is None
    boxed = project_prompt(mask, options, logits)
    assert boxed.mask_input is logits
    assert boxed.box.tolist() == [12.0, 21.0, 54.0, 39.0]


def test_a_shrinking_cap_is_kept_to_the_structure_end() -> None:
    # a sphere's caps: 0.47 of the trend on the last slice; the area rule stopped there before
    radii = [0.0] * 10 + [6.2, 10.9, 13.3] + [14.0] * 5 + [13.3, 10.9, 6.2] + [0.0] * 10
    labels = discs([(32.0, 32.0)] * len(radii), radii)
    labels[np.array(radii) == 0] = False
    segmenter = OracleThresholdSegmenter(image_from_labels(labels))
    result = propagate(segmenter, {15: labels[15]})
    assert result.kept_slices == list(range(10, 21))
    assert {s.reason for s in result.stops} == {"empty"}
