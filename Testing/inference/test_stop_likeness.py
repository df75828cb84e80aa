"""Where propagation from one flat box stops, with a model that always answers.

A box-prompted model (LiteMedSAM) past a structure's end still draws a confident blob
in the box it is given; the old rules (overlap, score, growth) let it run to the
volume's end. ``BoxBlobPredictor`` behaves that way; the likeness rule stops where the
mask holds what surrounded the seed. The area rule no longer extrapolates a trend, so
a structure with a waist is followed through it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from doubles import BoxBlobPredictor, RecordsMaskInputs, ThresholdPredictor
from volumes import truth_box

from RobustMedSAMLib.datasets import phantoms
from RobustMedSAMLib.evaluation.volumetric import central_slice
from RobustMedSAMLib.formats.volume import Volume
from RobustMedSAMLib.inference import mask_prompts, propagation
from RobustMedSAMLib.inference.loader import load_named_model
from RobustMedSAMLib.inference.mask_prompts import intensity_contrast
from RobustMedSAMLib.inference.propagation import MIN_CONTRAST, PropagationOptions
from RobustMedSAMLib.inference.segment_volume import SegmentOptions, VolumePrompts, segment_volume
from RobustMedSAMLib.inference.session import SegmentationSession
from RobustMedSAMLib.inference.slicing import slice_box_roi


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def _flat_box(volume: Volume, truth: np.ndarray, index: int):
    rows, cols = np.nonzero(truth[index])
    box = np.array([cols.min(), rows.min(), cols.max(), rows.max()])
    return slice_box_roi(volume, 0, index, box)


def _slices(mask: np.ndarray) -> list[int]:
    return np.flatnonzero(mask.any(axis=(1, 2))).tolist()


@pytest.mark.parametrize("zoom", [False, True])
def test_a_flat_box_stops_where_the_sphere_ends_with_a_model_that_always_answers(zoom):
    phantom = phantoms.sphere((30, 64, 64), (1.0, 1.0, 2.0), 12.0, contrast=150.0, noise=10.0)
    volume = Volume(phantom.image.astype(np.float32), phantom.ijk_to_ras, "sphere")
    truth = phantom.mask
    centre = _slices(truth)[len(_slices(truth)) // 2]
    options = SegmentOptions(propagate=True, zoom=zoom)
    session = SegmentationSession(volume, BoxBlobPredictor(115.0), window=(-160, 240))
    result = segment_volume(session, VolumePrompts(roi=_flat_box(volume, truth, centre)), options)
    assert result.decisions.zoom is zoom
    assert _slices(result.mask) == _slices(truth)  # before: all 30 slices (Dice 0.55)
    assert result.decisions.ends == {"low": "likeness", "high": "likeness"}
    assert _dice(result.mask, truth) > 0.9
    rejected = [stop["rejected"]["likeness"] for stop in result.stops]
    assert max(rejected) < 0.2  # the blob holds background: likeness near 0
    old = PropagationOptions(min_likeness=0.0)
    session = SegmentationSession(volume, BoxBlobPredictor(115.0), window=(-160, 240))
    before = segment_volume(
        session,
        VolumePrompts(roi=_flat_box(volume, truth, centre)),
        SegmentOptions(propagate=True, zoom=zoom, propagation=old),
    )
    assert len(_slices(before.mask)) == 30  # the old rules never stopped


WAISTS = [[0, 10, 10, 9, 7, 5, 7, 9, 10, 10, 0], [0, 10, 10, 7, 4, 7, 10, 10, 0]]


@pytest.mark.parametrize("radii", WAISTS)
def test_a_structure_with_a_waist_is_followed_through_it(radii):
    """Disc radii per slice (px): a gentle waist (areas 314 .. 78 .. 314), which the old
    trend rule stopped at, and a narrow one (314, 154, 50, 154, 314), which the area rule
    against the last two areas stops at too (it is off by default now)."""
    rows, cols = np.mgrid[:48, :48]
    truth = np.stack([((rows - 24) ** 2 + (cols - 24) ** 2 <= r * r) & (r > 0) for r in radii])
    rng = np.random.default_rng(0)
    image = np.where(truth, 200.0, 40.0) + rng.normal(0, 5, truth.shape)
    volume = Volume(image.astype(np.float32), np.diag([-1.0, -1.0, 2.0, 1.0]), "waist")
    prompt = VolumePrompts(roi=_flat_box(volume, truth, 1))
    session = SegmentationSession(volume, ThresholdPredictor(120.0), window=(-160, 240))
    result = segment_volume(session, prompt, SegmentOptions(propagate=True))
    assert _slices(result.mask) == _slices(truth)
    assert _dice(result.mask, truth) > 0.95
    area_rule = SegmentOptions(propagate=True, propagation=PropagationOptions(min_area_ratio=0.5))
    session = SegmentationSession(volume, ThresholdPredictor(120.0), window=(-160, 240))
    with_area_rule = segment_volume(session, prompt, area_rule)
    stopped = _slices(with_area_rule.mask) != _slices(truth)
    assert stopped == (min(radii[1:-1]) == 4)  # the narrow waist stops the area rule


class _Spy(RecordsMaskInputs, BoxBlobPredictor):
    """BoxBlobPredictor recording which prompts carried a mask input."""


@pytest.mark.parametrize("prompts, fed_back", [(("box",), False), (("point", "box", "mask"), True)])
def test_a_model_trained_without_mask_prompts_is_never_fed_its_logits(prompts, fed_back):
    phantom = phantoms.sphere((16, 48, 48), (1.0, 1.0, 2.0), 9.0, contrast=150.0, noise=10.0)
    volume = Volume(phantom.image.astype(np.float32), phantom.ijk_to_ras, "sphere")
    predictor = _Spy(115.0)
    predictor.prompts = prompts
    session = SegmentationSession(volume, predictor, window=(-160, 240))
    centre = _slices(phantom.mask)[len(_slices(phantom.mask)) // 2]
    roi = _flat_box(volume, phantom.mask, centre)
    result = segment_volume(session, VolumePrompts(roi=roi), SegmentOptions(propagate=True))
    assert result.decisions.projection == ("box" if not fed_back else "mask")
    assert any(predictor.mask_inputs) is fed_back  # before: LiteMedSAM got its logits back
    assert _dice(result.mask, phantom.mask) > 0.9


def _moving_lesion():
    """A tilted ellipsoid on 6.5 mm slices: its cross-section moves 8.5 px per slice,
    more than the 10 % the carried box grows by."""
    phantom = phantoms.ellipsoid((14, 96, 96), (0.8, 0.8, 6.5), (7.0, 5.0, 30.0),
                                 (0.0, 50.0, 0.0), contrast=150.0, noise=10.0)  # fmt: skip
    volume = Volume(phantom.image.astype(np.float32), phantom.ijk_to_ras, "moving")
    return volume, phantom.mask


def test_refining_each_slice_follows_a_cross_section_that_moves_between_thick_slices():
    volume, truth = _moving_lesion()
    centre = _slices(truth)[len(_slices(truth)) // 2]
    prompt = VolumePrompts(roi=_flat_box(volume, truth, centre))

    def run(refine_steps: int):
        session = SegmentationSession(volume, BoxBlobPredictor(115.0), window=(-160, 240))
        propagation = PropagationOptions(refine_steps=refine_steps)
        options = SegmentOptions(propagate=True, zoom=False, propagation=propagation)
        return segment_volume(session, prompt, options), session.stats.decoder_calls

    (lagging, calls), (refined, refined_calls) = run(0), run(2)
    # the carried box cuts the moving cross-section, and the cut mask's box cuts more:
    # the first slice below the seed is lost (the model's mask there is a sliver)
    assert _dice(lagging.mask, truth) < 0.85
    assert _slices(refined.mask) == _slices(truth)
    assert _dice(refined.mask, truth) > 0.9
    assert calls < refined_calls <= calls + 2 * (len(_slices(truth)) + 1)  # decoder only


def test_a_lesion_as_bright_as_its_ring_stops_where_it_ends_on_the_image_embedding(
    monkeypatch, tmp_path
):
    """LiteMedSAM on a ring-enhancing lesion (bright rim, dark core: its mean is its
    ring's) beside two tubes: the intensities cannot tell the lesion from what
    surrounds it, so likeness was off and the box walked along the tubes over all 16
    slices (Dice 0.69); measured on the image embedding, it stops at the lesion's
    ends (0.92 on its 4 slices)."""
    phantom = phantoms.rim_lesion()
    volume = Volume(phantom.image.astype(np.float32), phantom.ijk_to_ras, "rim lesion")
    truth = phantom.mask
    centre = central_slice(truth)
    roi = slice_box_roi(volume, 0, centre, truth_box(truth, centre, 0.1))
    lite = load_named_model("litemedsam", device="cpu")
    session = SegmentationSession(volume, lite.predictor(), disk_cache=tmp_path)
    held, around = intensity_contrast(session.windowed(centre), truth[centre])
    assert abs(held - around) < MIN_CONTRAST  # the phantom is what it claims
    options = SegmentOptions(propagate=True)
    result = segment_volume(session, VolumePrompts(roi=roi), options)
    assert result.decisions.ends == {"low": "likeness", "high": "likeness"}
    assert {stop["rejected"]["likeness_from"] for stop in result.stops} == {"features"}
    assert set(_slices(result.mask)) <= set(_slices(truth))
    after = _dice(result.mask, truth)
    monkeypatch.setattr(propagation, "MIN_FEATURE_CONTRAST", math.inf)  # as before
    session = SegmentationSession(volume, lite.predictor(), disk_cache=tmp_path)
    before = segment_volume(session, VolumePrompts(roi=roi), options)
    assert _slices(before.mask) == list(range(truth.shape[0]))
    assert after > _dice(before.mask, truth) + 0.1


def test_a_seed_as_bright_as_its_ring_is_measured_on_one_ring(monkeypatch):
    """``seed_reference`` draws the ring around the seed (a distance transform) once: the
    intensity contrast and, that being too low, the embedding's read the same ring."""
    rows, cols = np.mgrid[:40, :40]
    seed = (rows - 20) ** 2 + (cols - 20) ** 2 <= 36
    drawn, measured = [], []
    ring_around = mask_prompts.ring_around

    def counted(mask):
        drawn.append(mask)
        return ring_around(mask)

    def features(index, masks):
        measured.append(masks)
        return np.eye(2)  # held and around: as unlike as can be

    monkeypatch.setattr(mask_prompts, "ring_around", counted)
    monkeypatch.setattr(propagation, "ring_around", counted)
    flat = np.full(seed.shape, 0.5, np.float32)  # no intensity contrast at all
    reference = propagation.seed_reference(3, seed, lambda index: flat, features)
    assert reference.source == "features" and len(drawn) == 1
    np.testing.assert_array_equal(measured[0][1], ring_around(seed))
