"""The Python API with a researcher's mistakes: each is refused as an ``InputError``
naming what is wrong, and the caller's data is left as it was (docs/refusals.md)."""

from __future__ import annotations

import numpy as np
import pytest
from doubles import ThresholdPredictor

from RobustMedSAMLib.datasets.phantoms import sphere
from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.formats.markups import Roi
from RobustMedSAMLib.formats.segmentation import write_segmentation
from RobustMedSAMLib.formats.volume import Volume
from RobustMedSAMLib.inference.loader import LoadedModel
from RobustMedSAMLib.inference.propagation import PropagationOptions
from RobustMedSAMLib.inference.segment_volume import SegmentOptions, VolumePrompts, segment_volume
from RobustMedSAMLib.inference.session import SegmentationSession
from RobustMedSAMLib.inference.types import SlicePrompt


@pytest.fixture(scope="module")
def phantom():
    return sphere((24, 40, 48), radius=8.0)


@pytest.fixture
def volume(phantom) -> Volume:
    return Volume(phantom.image, phantom.ijk_to_ras, "sphere")


@pytest.fixture
def session(volume, phantom) -> SegmentationSession:
    return SegmentationSession(volume, ThresholdPredictor(float(phantom.image.mean())))


@pytest.mark.parametrize(
    ("points", "words"),
    [
        ([[1.0, 2.0]], "shape (1, 2): give N x 3"),  # (x, y) slice pixels given as RAS
        ([[1.0, 2.0, 3.0, 1.0]], "shape (1, 4): give N x 3"),  # homogeneous coordinates
        ([[np.nan, 0.0, 0.0]], "point 1 is [nan, 0.0, 0.0]: coordinates must be finite"),
        ([[0.0, 0.0, 0.0], [0.0, np.inf, 0.0]], "point 2 is [0.0, inf, 0.0]"),
        ([["a", "b", "c"]], "must be numbers"),
    ],
)
def test_prompt_points_that_are_not_finite_ras_triples_are_refused(points, words):
    """Before: ``cannot reshape array of size 2 into shape (3)`` (ValueError) from the
    slicing, and a NaN point went to slice -9223372036854775808."""
    with pytest.raises(InputError, match="positive") as refused:
        VolumePrompts(positive=points)
    assert words in str(refused.value)
    with pytest.raises(InputError, match="negative"):
        VolumePrompts(positive=[[0.0, 0.0, 0.0]], negative=points)


def test_one_point_as_three_numbers_is_still_one_point(session, volume):
    centre = volume.ijk_to_ras_points([[24, 20, 12]])[0]
    given = centre.copy()
    prompts = VolumePrompts(positive=given.tolist())
    assert prompts.positive.shape == (1, 3)
    assert segment_volume(session, prompts).mask.any()
    assert np.array_equal(given, centre)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        (([np.nan, 0.0, 0.0], [20.0, 20.0, 1.0], np.eye(3)), "center_ras must be 3 numbers"),
        (([0.0, 0.0, 0.0], [20.0, 20.0], np.eye(3)), "size must be 3 numbers"),
        (([0.0, 0.0, 0.0], [-20.0, 20.0, 1.0], np.eye(3)), "negative length"),
        (([0.0, 0.0, 0.0], [20.0, 20.0, 1.0], np.full((3, 3), np.nan)), "3x3 matrix"),
        # a volume's direction x spacing: a box 0.8 times the size asked (before: no error)
        (([0.0, 0.0, 0.0], [20.0, 20.0, 1.0], 0.8 * np.eye(3)), "must be unit vectors"),
    ],
)
def test_an_roi_with_unusable_fields_is_refused(fields, words):
    """Before: ``cannot convert float NaN to integer``, a broadcasting error, or (scaled
    axes, a negative size) a box of another size or an empty 3D ROI without a word."""
    with pytest.raises(InputError, match=words):
        Roi(*fields)


@pytest.mark.parametrize("roi", [((0, 0, 0), (20, 20, 1), np.eye(3)), np.arange(6.0)])
def test_an_roi_that_is_not_a_roi_is_refused(roi):
    """Before: ``AttributeError: 'tuple' object has no attribute 'corners_ras'``."""
    with pytest.raises(InputError, match="roi must be a Roi"):
        VolumePrompts(roi=roi)


def test_an_roi_of_lists_is_a_roi(session, volume):
    centre = volume.ijk_to_ras_points([[24, 20, 12]])[0]
    roi = Roi(centre.tolist(), [20.0, 20.0, 1.0], np.eye(3).tolist())
    assert segment_volume(session, VolumePrompts(roi=roi)).mask.any()


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"box": [np.nan, 1.0, 10.0, 10.0]}, "box .* not finite"),
        ({"box": [1.0, 2.0, 3.0]}, r"is not 4 numbers \(x0, y0, x1, y1\)"),
        ({"points": [[np.nan, 1.0]], "labels": [1]}, "points .* not finite"),
        ({"points": [[1.0, 2.0, 3.0]], "labels": [1]}, r"not \(x, y\) pairs"),
    ],
)
def test_a_slice_prompt_of_unusable_numbers_is_refused(fields, words):
    """Before: a NaN box passed its ``x0 <= x1`` check (every comparison with NaN is
    False) and the model got it; 3 numbers gave ``cannot reshape`` (ValueError); a
    point of 3 numbers became one and a half points."""
    with pytest.raises(InputError, match=words):
        SlicePrompt(**fields)


@pytest.mark.parametrize(
    ("index", "xy", "words"),
    [
        (12.5, (24.0, 20.0), "slice index 12.5 is not an int"),  # a RAS-derived k, unrounded
        ("12", (24.0, 20.0), "slice index '12' is not an int"),
        (12, (24.0,), r"is not \(x, y\)"),
        (12, 24.0, r"is not \(x, y\)"),
        (12, (24.0, 20.0, 12.0), r"is not \(x, y\)"),  # (x, y, k): the slice given twice
    ],
)
def test_a_click_off_any_slice_pixel_is_refused_and_not_kept(session, index, xy, words):
    """Before: 12.5 was cut to slice 12 (its clicks kept apart from slice 12's), (x, y, k)
    used as (x, y), and the rest were IndexError or TypeError."""
    with pytest.raises(InputError, match=words):
        session.click(index, xy)
    assert session.click_logits(12) is None and session.stats.decoder_calls == 0


def test_a_session_needs_a_volume_and_a_predictor(phantom, volume, session, tmp_path):
    """Before: ``AttributeError: 'numpy.ndarray' object has no attribute 'ijk_to_ras'``
    (the array given for the volume, in the session and in ``write_segmentation``), or
    ``'LoadedModel' object has no attribute ...`` once the first slice was asked."""
    with pytest.raises(InputError, match=r"wrap an array as Volume\(array, ijk_to_ras\)"):
        SegmentationSession(phantom.image, session.predictor)
    with pytest.raises(InputError, match=r"predictor must be a Predictor, not LoadedModel"):
        SegmentationSession(volume, LoadedModel("litemedsam", None, "litemedsam"))
    with pytest.raises(InputError, match="volume must be a Volume"):
        write_segmentation(tmp_path / "mask.seg.nrrd", phantom.mask, phantom.image)
    assert list(tmp_path.iterdir()) == []


def test_a_sessions_volume_cannot_be_replaced(session, volume, phantom):
    """Before: the new volume was segmented with the old one's encoded slices, and the
    mask came out of the old slice's shape (40 x 48 for a 20 x 20 slice)."""
    session.click(12, (24.0, 20.0))
    with pytest.raises(InputError, match="start a new SegmentationSession"):
        session.volume = Volume(phantom.image[:, :20, :20], phantom.ijk_to_ras)
    assert session.volume is volume


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (PropagationOptions(slice_step=2), "options must be a SegmentOptions, not Propagation"),
        ({"propagate": True}, "options must be a SegmentOptions, not dict"),
        (SegmentOptions(propagation={"slice_step": 2}), "propagation must be a Propagation"),
        (SegmentOptions(propagation=None), "not NoneType"),
    ],
)
def test_options_of_another_type_are_refused(session, volume, options, words):
    """Before: ``AttributeError: 'PropagationOptions' object has no attribute 'zoom'``
    (or ``'dict' object has no attribute 'validate'``)."""
    centre = volume.ijk_to_ras_points([[24, 20, 12]])
    with pytest.raises(InputError, match=words):
        segment_volume(session, VolumePrompts(positive=centre), options)
    assert session.stats.encoder_calls == 0


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"box_extension": float("inf")}, "box_extension=inf must be >= 0"),  # OverflowError
        ({"box_extension": float("nan")}, "box_extension=nan must be >= 0"),  # was taken
        ({"min_score": "0.5"}, "min_score='0.5' must lie in"),  # TypeError
        ({"n_positive": 1.5}, "whole numbers of points"),  # was taken
        ({"bounds": (5,)}, r"bounds=\(5,\) must be \(first, last\)"),  # not enough values
        ({"bounds": 5}, r"bounds=5 must be \(first, last\)"),  # cannot unpack
        ({"bounds": (2.7, 20.2)}, "two slice numbers"),  # was cut to (2, 20)
        ({"bounds": (float("nan"), 20)}, "two slice numbers"),  # NaN to integer
        ({"max_slices": 2.5}, "max_slices=2.5 must be a whole number"),  # was taken
    ],
)
def test_propagation_options_of_the_wrong_kind_are_refused(session, volume, fields, words):
    centre = volume.ijk_to_ras_points([[24, 20, 12]])
    options = SegmentOptions(propagate=True, propagation=PropagationOptions(**fields))
    with pytest.raises(InputError, match=words):
        segment_volume(session, VolumePrompts(positive=centre), options)


@pytest.mark.parametrize(
    ("matrix", "words"),
    [
        (np.eye(3), r"ijk_to_ras has shape \(3, 3\); give the 4x4"),  # cannot reshape
        ("eye", "ijk_to_ras has no numbers"),  # could not convert string to float
        # a projective last row: ras_to_ijk (the full inverse) then disagreed with
        # ijk_to_ras_points (its top rows), and prompts went to other voxels
        ([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [1, 1, 1, 5]], "last row is .* not 0 0 0 1"),
    ],
)
def test_an_ijk_to_ras_that_is_not_a_4x4_affine_is_refused(phantom, matrix, words):
    with pytest.raises(InputError, match=words):
        Volume(phantom.image, matrix, "ct")


@pytest.mark.parametrize(
    ("voxels", "words"),
    [
        (lambda a: a.astype(np.complex64), "complex64 voxels: a real-valued volume"),
        (lambda a: a.astype(str), "voxels: a real-valued volume"),
        (lambda a: a[:0], r"holds no voxels \(shape \(0, 40, 48\)\)"),
    ],
)
def test_voxels_read_volume_would_refuse_are_refused_from_an_array(phantom, voxels, words):
    """As ``read_volume`` refuses them in a file (before: complex voxels lost their
    imaginary part with a ComplexWarning, text voxels were taken, and no voxels gave
    ``the image has no finite intensities to window``)."""
    with pytest.raises(InputError, match=words):
        Volume(voxels(phantom.image), phantom.ijk_to_ras, "ct")


@pytest.mark.parametrize("suffix", [".seg.nrrd", ".nii.gz"])
def test_a_label_value_past_uint32_is_refused_not_wrapped(phantom, volume, tmp_path, suffix):
    """Before: the label map was cast to uint32, so 2**32 + 1 was written as 1 (and the
    ``.seg.nrrd`` header named a segment of value 4294967297 that no voxel held)."""
    mask = phantom.mask.astype(np.int64) * (2**32 + 1)
    with pytest.raises(InputError, match="label value 4294967297 is over 4294967295"):
        write_segmentation(tmp_path / f"mask{suffix}", mask, volume)
    assert list(tmp_path.iterdir()) == []


def test_an_roi_whose_corners_overflow_is_refused():
    """Finite fields whose corners are not (a 1e308 mm box): a server job failed on it as
    `internal` (inf - inf)."""
    with pytest.raises(InputError, match="corners past any number"):
        Roi([1e308, 0, 0], [1.7e308, 1, 1], np.eye(3))


def test_seeds_in_a_list_and_a_cancel_that_cannot_be_called_are_refused():
    from types import SimpleNamespace

    from RobustMedSAMLib.inference.propagation import propagate
    from RobustMedSAMLib.progress import cancel_check

    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    with pytest.raises(InputError, match="seeds must map slice indices to masks"):
        propagate(SimpleNamespace(n_slices=4), [mask])  # type: ignore[arg-type]
    with pytest.raises(InputError, match="cancel must be a threading.Event or a function"):
        cancel_check(True)  # type: ignore[arg-type]
