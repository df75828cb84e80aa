"""Slicing axes and RAS prompts mapped onto slices of oblique, anisotropic volumes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.formats.markups import Roi
from RobustMedSAMLib.formats.volume import Volume
from RobustMedSAMLib.inference.slicing import (
    RoiSlices,
    axis_index,
    encoding_order,
    get_slice,
    ijk_box_roi,
    prompts_for_slice,
    ras_to_slice_points,
    roi_on_slice,
    roi_thickness,
    roi_to_slice_box,
    roi_voxels,
    set_slice,
    slice_centre_ras,
)

SHAPE = (6, 9, 11)  # K, J, I
SPACING = np.array([0.8, 1.2, 3.0])  # I, J, K


def make_volume(directions: np.ndarray, origin=(12.0, -40.0, 7.5)) -> Volume:
    """A volume whose voxel value is its flat KJI index; ``directions`` columns: unit I, J, K."""
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = directions @ np.diag(SPACING)
    ijk_to_ras[:3, 3] = origin
    array = np.arange(np.prod(SHAPE), dtype=np.int32).reshape(SHAPE)
    return Volume(array, ijk_to_ras, "test")


def oblique_axial() -> Volume:
    """Axial acquisition tilted by 20-25 degrees: I ~ L, J ~ P (as LPS files), K ~ S."""
    tilt = Rotation.from_euler("xyz", [20, -15, 25], degrees=True).as_matrix()
    return make_volume(tilt @ np.diag([-1.0, -1.0, 1.0]))


def sagittal_acquired() -> Volume:
    """A sagittal MR: columns I go anterior, rows J go inferior, slices K go left."""
    return make_volume(np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float))


def ras_of(volume: Volume, ijk) -> np.ndarray:
    return volume.ijk_to_ras_points(ijk)[0]


def test_axes_of_oblique_axial_volume():
    volume = oblique_axial()
    assert [axis_index(volume, n) for n in ("axial", "coronal", "sagittal")] == [0, 1, 2]


def test_axes_of_sagittal_acquisition():
    volume = sagittal_acquired()
    # axial normal S is along J (numpy 1), coronal A along I (numpy 2), sagittal R along K (0)
    assert [axis_index(volume, n) for n in ("axial", "coronal", "sagittal")] == [1, 2, 0]


def test_unknown_axis_name():
    with pytest.raises(InputError, match="axial, coronal, sagittal"):
        axis_index(oblique_axial(), "transverse")


@pytest.mark.parametrize("make", [oblique_axial, sagittal_acquired])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_ras_point_lands_on_its_voxel(make, axis):
    volume = make()
    i, j, k = 7, 2, 4
    indices, xy = ras_to_slice_points(volume, axis, [ras_of(volume, [i, j, k])])
    assert indices.tolist() == [(k, j, i)[axis]]
    x, y = np.rint(xy[0]).astype(int)
    np.testing.assert_allclose(xy[0], [x, y], atol=1e-9)
    assert get_slice(volume.array, axis, indices[0])[y, x] == volume.array[k, j, i]


def test_slice_layout_rows_and_columns():
    array = np.zeros(SHAPE)
    assert get_slice(array, 0, 1).shape == (9, 11)  # rows J, cols I
    assert get_slice(array, 1, 1).shape == (6, 11)  # rows K, cols I
    assert get_slice(array, 2, 1).shape == (6, 9)  # rows K, cols J
    get_slice(array, 2, 3)[5, 8] = 1.0  # a view: writes through
    assert array[5, 8, 3] == 1.0


def test_set_slice_writes_one_plane():
    array = np.zeros(SHAPE, np.uint8)
    set_slice(array, 1, 4, np.ones((6, 11), np.uint8))
    assert array.sum() == 66 and array[:, 4, :].all()
    with pytest.raises(InputError, match=r"shape \(9, 11\)"):
        set_slice(array, 1, 4, np.ones((9, 11)))
    with pytest.raises(InputError, match="outside 0..5"):
        get_slice(array, 0, 6)


def test_point_half_a_voxel_outside_is_clipped_further_is_refused():
    volume = oblique_axial()
    inside = ras_of(volume, [-0.4, 3, 2])
    indices, xy = ras_to_slice_points(volume, 0, [inside])
    assert indices.tolist() == [2] and xy[0][0] == 0.0
    outside = ras_of(volume, [3, 9.7, 2])
    with pytest.raises(InputError, match=r"negative point 2 at RAS .* lies outside"):
        ras_to_slice_points(volume, 0, [inside, outside], kind="negative point")
    far = np.array([1e300, 0.0, 0.0])  # a typo in a markups file: a short line still
    with pytest.raises(InputError, match=r"point 1 at RAS \(1e\+300, 0\.0, 0\.0\)") as refused:
        ras_to_slice_points(volume, 0, [far])
    assert len(str(refused.value)) < 200


def axis_aligned_roi(volume: Volume, center_ijk, half_voxels) -> Roi:
    """An ROI along the volume's own axes, ``half_voxels`` (I, J, K) from its centre."""
    center, half = np.asarray(center_ijk, float), np.asarray(half_voxels, float)
    return ijk_box_roi(volume, center - half, center + half)


@pytest.mark.parametrize("make", [oblique_axial, sagittal_acquired])
def test_roi_gives_slice_range_and_box(make):
    volume = make()
    roi = axis_aligned_roi(volume, [5, 4, 3], [2, 1.5, 1])
    (first, last), box = roi_to_slice_box(volume, 0, roi)
    assert (first, last) == (2, 4)
    np.testing.assert_allclose(box, [3, 2.5, 7, 5.5], atol=1e-5)
    (first, last), box = roi_to_slice_box(volume, 2, roi)
    assert (first, last) == (3, 7)
    np.testing.assert_allclose(box, [2.5, 2, 5.5, 4], atol=1e-5)  # x = J, y = K


@pytest.mark.parametrize("axis", [0, 2])
def test_roi_on_slice_is_flat_on_that_slice_with_the_same_box(axis):
    """A 3D ROI flattened onto one slice (as the panel sends it for a one-slice request)
    has no thickness, sits on that slice and keeps the ROI's box there."""
    volume = oblique_axial()
    roi = axis_aligned_roi(volume, [5, 4, 3], [2, 1.5, 1])
    (first, _), box = roi_to_slice_box(volume, axis, roi)
    flat = roi_on_slice(volume, axis, roi, first)
    assert roi_thickness(volume, axis, flat) == 0
    (on, on_last), flat_box = roi_to_slice_box(volume, axis, flat)
    assert on == on_last == first
    np.testing.assert_allclose(flat_box, box, atol=1e-5)


def test_roi_partly_outside_is_clipped_and_roi_outside_refused():
    volume = oblique_axial()
    (first, last), box = roi_to_slice_box(volume, 1, axis_aligned_roi(volume, [0, 8, 3], [3, 2, 1]))
    assert (first, last) == (6, 8)
    np.testing.assert_allclose(box, [0, 2, 3, 4], atol=1e-5)  # x = I, y = K
    with pytest.raises(InputError, match="does not overlap"):
        roi_to_slice_box(volume, 0, axis_aligned_roi(volume, [30, 4, 3], [2, 2, 2]))


def test_roi_without_width_on_the_slices_is_refused_naming_its_view():
    volume = sagittal_acquired()  # K goes left: sagittal slices are along K
    drawn_on_axial = axis_aligned_roi(volume, [5, 4, 3], [2, 0, 1])  # no extent along J (S)
    assert roi_to_slice_box(volume, 1, drawn_on_axial)[0] == (4, 4)  # its own view: fine
    for axis in (0, 2):
        # (the article too: it read "drawn on a axial slice")
        with pytest.raises(
            InputError, match="no width or no height .* an axial slice\\? use --axis axial"
        ):
            roi_to_slice_box(volume, axis, drawn_on_axial)
    point = axis_aligned_roi(volume, [5, 4, 3], [0, 0, 0])
    with pytest.raises(InputError, match="give it a width and a height"):
        roi_to_slice_box(volume, 0, point)


def test_prompts_grouped_by_slice():
    volume = oblique_axial()
    positive = [ras_of(volume, [1, 2, 1]), ras_of(volume, [3, 4, 4]), ras_of(volume, [5, 6, 1])]
    negative = [ras_of(volume, [2, 2, 4])]
    prompts = prompts_for_slice(volume, 0, positive, negative)
    assert list(prompts) == [1, 4]
    np.testing.assert_allclose(prompts[1].points, [[1, 2], [5, 6]], atol=1e-5)
    assert prompts[1].labels.tolist() == [1, 1] and prompts[1].box is None
    np.testing.assert_allclose(prompts[4].points, [[3, 4], [2, 2]], atol=1e-5)
    assert prompts[4].labels.tolist() == [1, 0]


def test_box_goes_to_roi_centre_and_to_point_slices_it_spans():
    volume = oblique_axial()
    roi = axis_aligned_roi(volume, [5, 4, 3], [2, 1.5, 1])
    prompts = prompts_for_slice(volume, 0, roi=roi)
    assert list(prompts) == [3]
    np.testing.assert_allclose(prompts[3].box, [3, 2.5, 7, 5.5], atol=1e-5)

    positive = [ras_of(volume, [5, 4, 2]), ras_of(volume, [5, 4, 5])]
    prompts = prompts_for_slice(volume, 0, positive, roi=roi, box_slice=4)
    assert list(prompts) == [2, 4, 5]
    assert prompts[2].box is not None and prompts[4].box is not None
    assert prompts[5].box is None and len(prompts[4].points) == 0


def test_prompt_errors():
    volume = oblique_axial()
    roi = axis_aligned_roi(volume, [5, 4, 3], [2, 1.5, 1])
    with pytest.raises(InputError, match="slice 0 is outside the ROI, which spans slices 2..4"):
        prompts_for_slice(volume, 0, roi=roi, box_slice=0)
    with pytest.raises(InputError, match="no prompt"):
        prompts_for_slice(volume, 0, negative=[ras_of(volume, [1, 1, 1])])


def test_encoding_order_starts_at_the_centre_and_alternates_outwards():
    assert encoding_order(5, 1) == [1, 2, 0, 3, 4]
    assert encoding_order(4, 9) == [3, 2, 1, 0]  # a centre past the end is clipped
    assert encoding_order(0, 0) == []
    assert sorted(encoding_order(7, 3)) == list(range(7))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_centre_lies_on_its_slice_of_an_oblique_volume(axis):
    volume = oblique_axial()
    for index in (0, volume.shape[axis] // 2, volume.shape[axis] - 1):
        centre = slice_centre_ras(volume, axis, index)
        indices, xy = ras_to_slice_points(volume, axis, centre[None])
        assert indices[0] == index
        rows, cols = get_slice(volume.array, axis, index).shape
        np.testing.assert_allclose(xy[0], [(cols - 1) / 2, (rows - 1) / 2], atol=1e-9)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_roi_slices_equal_the_whole_volume_mask(axis):
    """``RoiSlices`` (what a 3D ROI's propagation reads) gives the slices of
    ``roi_voxels`` without holding the volume-sized mask."""
    volume = Volume(np.zeros((12, 30, 40), np.int16), np.diag([0.8, 0.9, 2.0, 1.0]), "v")
    angle = np.deg2rad(25)
    axes = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    tilted = Roi(np.array([14.0, 12.0, 10.0]), np.array([18.0, 10.0, 9.0]), axes)
    outside = Roi(np.array([-50.0, 12.0, 10.0]), np.array([4.0, 4.0, 4.0]), np.eye(3))
    for roi, expect_voxels in ((tilted, True), (outside, False)):
        whole = np.moveaxis(roi_voxels(volume, roi), axis, 0)
        assert (0 < whole.sum() < whole.size) if expect_voxels else whole.sum() == 0
        lazy = RoiSlices(volume, roi, axis)
        assert lazy.shape == whole.shape
        for index in range(whole.shape[0]):
            assert np.array_equal(lazy[index], whole[index])


def test_a_huge_roi_holds_the_whole_volume_without_overflow_warnings():
    """A 1e300 mm ROI (a typo in a markups file) is clipped to the volume; its corners'
    voxel indices were cast to int before clipping (RuntimeWarning, garbage bounds)."""
    import warnings

    volume = oblique_axial()
    roi = Roi(volume.ijk_to_ras_points([[5, 4, 3]])[0], (1e300,) * 3, np.eye(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert roi_voxels(volume, roi).all()
