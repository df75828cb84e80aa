"""What the model is shown: windows of extreme intensity ranges, and slices too thin."""

from __future__ import annotations

import numpy as np
import pytest

from RobustMedSAMLib.cli import main
from RobustMedSAMLib.datasets.phantoms import sphere
from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.formats.markups import Roi
from RobustMedSAMLib.formats.volume import Volume, write_volume
from RobustMedSAMLib.inference.loader import load_named_model
from RobustMedSAMLib.inference.preprocessing import auto_window, window_to_uint8
from RobustMedSAMLib.inference.segment_volume import SegmentOptions, VolumePrompts, segment_volume
from RobustMedSAMLib.inference.session import SegmentationSession
from RobustMedSAMLib.inference.slicing import MIN_SLICE_SIDE, check_slice_size, ijk_box_roi
from RobustMedSAMLib.inference.zoom import zoom_region

RAMP = np.random.default_rng(0).uniform(0, 1, (64, 64))  # a slice with values spread over [0, 1)


def windowed(image: np.ndarray) -> np.ndarray:
    return window_to_uint8(image, auto_window(image))


@pytest.mark.parametrize(
    ("low", "high", "dtype"),
    [
        (-3e38, 3e38, np.float32),  # the width overflows float32
        (-1e300, 1e300, np.float64),
        (-1.7e308, 1.7e308, np.float64),  # the width overflows float64 too
        (0.0, 1e-30, np.float64),  # the whole range is under the old 1e-6 floor
        (0.0, 1e-30, np.float32),
        (5.0, 5.0 + 1e-12, np.float64),  # a range of 1e-12 on an offset of 5
        (-1000.0, 2000.0, np.int16),  # CT: an ordinary range gives the same picture
    ],
)
def test_window_of_an_affine_copy_is_the_same_picture(low, high, dtype):
    """Windowing ignores where and how wide the range is: ``a + b x`` looks like ``x``."""
    image = (2 * (low / 2 + (high / 2 - low / 2) * RAMP)).astype(dtype)  # halves: no overflow
    expected = windowed(RAMP)
    got = windowed(image)
    assert got.max() - got.min() >= 250  # not blank
    # off by one grey level at most: float64 rounding of a + b x, or int16 quantisation
    assert np.abs(got.astype(int) - expected).max() <= 1 + 255 * (dtype == np.int16) / 3000


@pytest.fixture(scope="module")
def lite():
    return load_named_model("litemedsam", device="cpu")


def test_the_model_segments_a_sphere_alike_whatever_its_intensity_range(lite):
    """Before: float32 +-3e38 and 1e-30 ranges (and 1e300, 1e-12) gave empty masks."""
    phantom = sphere((24, 64, 64), spacing=(1.0, 1.0, 2.0), radius=12.0)
    image = phantom.image.astype(np.float64)
    unit = (image - image.min()) / (image.max() - image.min())
    centre = np.argwhere(phantom.mask).mean(axis=0)[::-1]  # i, j, k
    masks = {}
    for name, array in {
        "int16": phantom.image,
        "float32 +-3e38": ((unit - 0.5) * 6e38).astype(np.float32),
        "1e-30": unit * 1e-30,  # the other ranges: test_window_of_an_affine_copy_...
    }.items():
        volume = Volume(array, phantom.ijk_to_ras, name)
        k = int(round(centre[2]))
        rows, cols = np.nonzero(phantom.mask[k])
        low, high = (
            (cols.min() - 2, rows.min() - 2, k - 0.4),
            (cols.max() + 2, rows.max() + 2, k + 0.4),
        )
        prompts = VolumePrompts(roi=ijk_box_roi(volume, low, high))
        session = SegmentationSession(volume, lite.predictor())
        masks[name] = segment_volume(session, prompts, SegmentOptions(propagate=False)).mask
    assert dice(masks["int16"][k], phantom.mask[k]) > 0.8
    for name, mask in masks.items():
        assert dice(mask, masks["int16"]) > 0.95, name


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_window_width_floor_is_relative():
    image = 1.0 + np.array([[0.0, 1e-12], [2e-12, 3e-12]])
    np.testing.assert_array_equal(window_to_uint8(image, (1.0, 1.0 + 3e-12)), [[0, 85], [170, 255]])
    # a window narrower than float64 can resolve at its magnitude stays defined (no 0/0)
    assert window_to_uint8(np.full((2, 2), 7.0), (7.0, 7.0)).tolist() == [[0, 0], [0, 0]]


def test_non_finite_voxels_still_window_to_0_and_255():
    image = np.array([[np.nan, np.inf], [-np.inf, 0.5]])
    assert window_to_uint8(image, (0.0, 1.0)).tolist() == [[0, 255], [0, 128]]


def thin_volume(shape=(2, 64, 64)) -> Volume:
    return Volume(np.zeros(shape, np.int16), np.eye(4), "thin")


@pytest.mark.parametrize("axis", [1, 2])  # coronal and sagittal slices of a 2-slice volume
def test_two_row_slices_are_refused_with_the_axis_that_works(axis):
    with pytest.raises(InputError, match=r"'thin' .* 2 voxels thick .*use --axis axial"):
        check_slice_size(thin_volume(), axis)
    check_slice_size(thin_volume(), 0)  # axial slices are 64x64


def test_a_volume_with_no_usable_axis_says_so():
    with pytest.raises(InputError, match="no axis gives slices that large"):
        check_slice_size(thin_volume((1, 1, 1)), 0)


def test_slices_of_the_minimum_side_are_accepted():
    check_slice_size(thin_volume((MIN_SLICE_SIDE, 64, 64)), 1)


def test_cli_refuses_thin_slices_before_loading_any_model(tmp_path, capsys):
    path = write_volume(thin_volume(), tmp_path / "thin.nrrd")
    points = tmp_path / "p.mrk.json"
    points.write_text(
        '{"markups": [{"type": "Fiducial", "coordinateSystem": "RAS",'
        ' "controlPoints": [{"position": [10, 10, 0]}]}]}'
    )
    missing = tmp_path / "no-such-checkpoint.pth"  # loading it would fail with another error
    argv = ["segment", str(path), "--points", str(points), "--out", str(tmp_path / "o.seg.nrrd")]
    code = main([*argv, "--axis", "coronal", "--model", "sam", "--checkpoint", str(missing)])
    assert code == 2
    err = capsys.readouterr().err
    assert "too small for the model" in err and "--axis axial" in err


def test_zoom_crop_is_never_thinner_than_a_usable_slice():
    volume = Volume(np.zeros((5, 64, 64), np.int16), np.eye(4), "v")
    roi = Roi(np.array([30.0, 30.0, 2.0]), np.array([1.0, 1.0, 0.0]), np.eye(3))
    region = zoom_region(volume, 0, roi)
    assert all(r.stop - r.start >= MIN_SLICE_SIDE for r in region[1:])
    assert all(0 <= r.start and r.stop <= 64 for r in region[1:])
