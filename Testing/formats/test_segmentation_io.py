"""Segmentation files: .seg.nrrd that Slicer loads (and Slicer's that we load), label maps."""

from __future__ import annotations

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
from scipy.spatial.transform import Rotation
from slicer_headless import (
    add_volume,
    segment_on_grid,
    segmentation_node_from_file,
    slicer_scene_fixture,
)

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.formats.segmentation import Segment, read_segmentation, write_segmentation
from RobustMedSAMLib.formats.volume import Volume, read_volume

slicer_scene = pytest.fixture(slicer_scene_fixture)

SHAPE = (7, 9, 10)  # K, J, I
SEGMENTS = [
    Segment(1, "liver", (0.8, 0.4, 0.2)),
    Segment(3, "tumour", (1.0, 0.0, 0.0)),
    Segment(4, "nothing yet", (0.0, 1.0, 0.25)),
]


def oblique_volume() -> Volume:
    ijk_to_ras = np.eye(4)
    rotation = Rotation.from_euler("zyx", [30, 10, -20], degrees=True).as_matrix()
    ijk_to_ras[:3, :3] = rotation @ np.diag([0.75, 1.25, 2.5])
    ijk_to_ras[:3, 3] = [-30.0, 12.0, 55.0]
    return Volume(np.zeros(SHAPE, np.int16), ijk_to_ras, "ct")


def labelmap() -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:5, 3:7, 2:8] = 1
    mask[3, 4:6, 3:5] = 3
    mask[6, 1, 9] = 3
    return mask


def test_seg_nrrd_round_trip(tmp_path):
    volume = oblique_volume()
    path = write_segmentation(tmp_path / "out.seg.nrrd", labelmap(), volume, SEGMENTS)
    mask, segments = read_segmentation(path)
    np.testing.assert_array_equal(mask, labelmap())
    assert segments == SEGMENTS
    data, header = nrrd.read(str(path), index_order="C")
    np.testing.assert_array_equal(data, labelmap())
    assert header["space"] == "left-posterior-superior"
    lps = np.diag([-1, -1, 1]) @ volume.ijk_to_ras[:3, :3]
    np.testing.assert_allclose(header["space directions"], lps.T)
    np.testing.assert_allclose(header["space origin"], volume.ijk_to_ras[:3, 3] * [-1, -1, 1])
    assert [p.name for p in tmp_path.iterdir()] == ["out.seg.nrrd"]


def test_header_fields_match_slicer(tmp_path, slicer_scene):
    volume = oblique_volume()
    reference = add_volume(slicer_scene, volume.array, volume.ijk_to_ras)
    node = slicer_scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    segment_id = node.GetSegmentation().AddEmptySegment("", "liver", [0.8, 0.4, 0.2])
    assert segment_id
    slicer_scene.slicer.util.updateSegmentBinaryLabelmapFromArray(
        (labelmap() == 1).astype(np.uint8), node, segment_id, reference
    )
    storage = slicer_scene.slicer.vtkMRMLSegmentationStorageNode()
    slicer_scene.scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "slicer.seg.nrrd"))
    assert storage.WriteData(node)
    write_segmentation(tmp_path / "ours.seg.nrrd", labelmap() == 1, volume, SEGMENTS[:1])

    theirs = nrrd.read_header(str(tmp_path / "slicer.seg.nrrd"))
    ours = nrrd.read_header(str(tmp_path / "ours.seg.nrrd"))
    assert set(ours) == set(theirs)
    for key in ("space", "kinds", "Segment0_Extent", "Segment0_Layer", "Segment0_LabelValue"):
        assert ours[key] == theirs[key], key
    for key in ("sizes", "space directions", "space origin"):
        np.testing.assert_allclose(ours[key], theirs[key], atol=1e-9)
    for key in ("Segmentation_MasterRepresentation", "Segmentation_ReferenceImageExtentOffset"):
        assert ours[key] == theirs[key], key


def test_slicer_loads_our_seg_nrrd(tmp_path, slicer_scene):
    volume = oblique_volume()
    path = write_segmentation(tmp_path / "ours.seg.nrrd", labelmap(), volume, SEGMENTS)
    node = segmentation_node_from_file(slicer_scene, path)
    reference = add_volume(slicer_scene, volume.array, volume.ijk_to_ras)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3
    for n, expected in enumerate(SEGMENTS):
        segment = segmentation.GetNthSegment(n)
        assert segment.GetName() == expected.name
        np.testing.assert_allclose(segment.GetColor(), expected.color, atol=1e-6)
        assert segment.GetLabelValue() == expected.label
        mask = segment_on_grid(slicer_scene, node, segmentation.GetNthSegmentID(n), reference)
        np.testing.assert_array_equal(mask, labelmap() == expected.label)


def slicer_written(tmp_path, scene, volume, crop: bool):
    """A .seg.nrrd written by Slicer: liver, an overlapping tumour (second layer), a cyst."""
    reference = add_volume(scene, volume.array, volume.ijk_to_ras)
    node = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    masks = {"liver": labelmap() > 0, "tumour": labelmap() == 3, "cyst": np.zeros(SHAPE, bool)}
    masks["cyst"][1, 1:3, 1:3] = True
    for name, mask in masks.items():
        segment_id = node.GetSegmentation().AddEmptySegment("", name, [0.1, 0.2, 0.3])
        scene.slicer.util.updateSegmentBinaryLabelmapFromArray(
            mask.astype(np.uint8), node, segment_id, reference
        )
    storage = scene.slicer.vtkMRMLSegmentationStorageNode()
    scene.scene.AddNode(storage)
    storage.SetCropToMinimumExtent(crop)
    storage.SetFileName(str(tmp_path / f"slicer_{crop}.seg.nrrd"))
    assert storage.WriteData(node)
    return tmp_path / f"slicer_{crop}.seg.nrrd", masks


@pytest.mark.parametrize("crop", [False, True])
def test_we_read_slicer_seg_nrrd(tmp_path, slicer_scene, crop):
    volume = oblique_volume()
    path, masks = slicer_written(tmp_path, slicer_scene, volume, crop)
    header = nrrd.read_header(str(path))
    assert header["dimension"] == 4  # the overlap forces two layers
    offset = "1 1 1" if crop else "0 0 0"  # a cropped file starts at the first non-empty voxel
    assert header["Segmentation_ReferenceImageExtentOffset"] == offset
    mask, segments = read_segmentation(path, reference=volume)
    assert mask.shape == SHAPE
    assert [s.name for s in segments] == ["liver", "tumour", "cyst"]
    assert segments[0].color == (0.1, 0.2, 0.3)
    by_name = {s.name: s.label for s in segments}
    np.testing.assert_array_equal(mask == by_name["tumour"], masks["tumour"])
    np.testing.assert_array_equal(mask == by_name["cyst"], masks["cyst"])
    liver_outside_tumour = masks["liver"] & ~masks["tumour"]
    np.testing.assert_array_equal(mask == by_name["liver"], liver_outside_tumour)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_labelmap_files(tmp_path, suffix):
    volume = oblique_volume()
    path = write_segmentation(tmp_path / f"labels{suffix}", labelmap(), volume)
    written = read_volume(path)
    np.testing.assert_array_equal(written.array, labelmap())
    np.testing.assert_allclose(written.ijk_to_ras, volume.ijk_to_ras, atol=1e-4)
    assert sitk.ReadImage(str(path)).GetPixelID() == sitk.sitkUInt8
    mask, segments = read_segmentation(path)
    np.testing.assert_array_equal(mask, labelmap())
    assert [(s.label, s.name) for s in segments] == [(1, "Segment_1"), (3, "Segment_3")]


def test_bool_mask_is_one_segment(tmp_path):
    path = write_segmentation(tmp_path / "m.seg.nrrd", labelmap() > 0, oblique_volume())
    mask, segments = read_segmentation(path)
    np.testing.assert_array_equal(mask, labelmap() > 0)
    assert [(s.label, s.name) for s in segments] == [(1, "Segment_1")]


def test_bad_output_leaves_existing_file(tmp_path):
    volume = oblique_volume()
    path = tmp_path / "out.seg.nrrd"
    path.write_bytes(b"previous result")
    with pytest.raises(InputError, match=r"mask shape \(7, 9\) differs"):
        write_segmentation(path, np.zeros((7, 9), np.uint8), volume)
    with pytest.raises(InputError, match=r"mask values \[3\] have no segment"):
        write_segmentation(path, labelmap(), volume, SEGMENTS[:1])
    with pytest.raises(InputError, match="bool or non-negative integers"):
        write_segmentation(path, labelmap().astype(float), volume)
    with pytest.raises(InputError, match="colour must be 3 values in 0..1"):
        write_segmentation(path, labelmap(), volume, [(1, "a", (255, 0, 0)), (3, "b", (1, 0, 0))])
    with pytest.raises(InputError, match="cannot tell the format"):
        write_segmentation(tmp_path / "out.png", labelmap(), volume)
    assert path.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.seg.nrrd"]


def test_read_missing_segmentation(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_segmentation(tmp_path / "none.seg.nrrd")
