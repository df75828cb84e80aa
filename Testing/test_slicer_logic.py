"""The Slicer module's Logic on real MRML nodes (slicer-core, headless).

slicer-core has no ``slicer.ScriptedLoadableModule`` (it needs Qt); minimal base classes
stand in for it here, in this file only. Segmentation uses ``ThresholdPredictor``.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
import vtk  # noqa: E402
from doubles import ThresholdPredictor  # noqa: E402
from scipy.spatial.transform import Rotation  # noqa: E402
from slicer_headless import add_volume, slicer_scene_fixture, vtk_matrix  # noqa: E402
from test_segmentation_io import segment_on_grid, segmentation_node_from_file  # noqa: E402

from RobustMedSAMLib.errors import CancelledError, InputError  # noqa: E402
from RobustMedSAMLib.phantoms import sphere  # noqa: E402
from RobustMedSAMLib.segment import SegmentOptions  # noqa: E402

slicer_scene = pytest.fixture(slicer_scene_fixture)
MODULE_FILE = Path(__file__).resolve().parents[1] / "RobustMedSAM" / "RobustMedSAM.py"
THRESHOLD = 80.0  # HU between the phantom's background (40) and sphere (120)


def _stub_scripted_module_bases() -> None:
    """Stand-ins for the Qt-dependent ``slicer.ScriptedLoadableModule`` base classes."""
    if importlib.util.find_spec("slicer.ScriptedLoadableModule") is None:
        stub = types.ModuleType("slicer.ScriptedLoadableModule")

        class ScriptedLoadableModule:
            def __init__(self, parent) -> None:
                self.parent = parent

        class ScriptedLoadableModuleLogic:
            def __init__(self, parent=None) -> None:
                self.parent = parent

        stub.ScriptedLoadableModule = ScriptedLoadableModule
        stub.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
        sys.modules["slicer.ScriptedLoadableModule"] = stub
        slicer.ScriptedLoadableModule = stub


def _load_module():
    _stub_scripted_module_bases()
    spec = importlib.util.spec_from_file_location("RobustMedSAM", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["RobustMedSAM"] = module  # as Slicer imports it
    spec.loader.exec_module(module)
    return module


module = _load_module()


def oblique_matrix() -> np.ndarray:
    matrix = np.eye(4)
    rotation = Rotation.from_euler("zyx", [25, 8, -12], degrees=True).as_matrix()
    matrix[:3, :3] = rotation @ np.diag([0.9, 0.8, 2.0])
    matrix[:3, 3] = [-14.0, 22.0, 37.0]
    return matrix


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def point_list(scene, points_ras, name="P"):
    node = scene.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for point in points_ras:
        node.AddControlPoint(list(map(float, point)))
    return node


@pytest.fixture
def phantom_scene(slicer_scene):
    """A sphere phantom in an oblique volume node, the logic, and a point at its centre."""
    phantom = sphere((24, 40, 40), spacing=(0.9, 0.8, 2.0), radius=11.0)
    matrix = oblique_matrix()
    node = add_volume(slicer_scene, phantom.image, matrix, "phantom")
    centre_kji = np.argwhere(phantom.mask).mean(axis=0)
    centre_ras = matrix[:3, :3] @ centre_kji[::-1] + matrix[:3, 3]
    seg = slicer_scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    return types.SimpleNamespace(
        scene=slicer_scene,
        phantom=phantom,
        volume_node=node,
        segmentation=seg,
        logic=module.RobustMedSAMLogic(),
        points=point_list(slicer_scene, [centre_ras]),
    )


def run(ns, **kwargs) -> tuple[str, list]:
    """Segment the sphere from the centre point, propagating; returns (segment ID, scores)."""
    session = ns.logic.start_session(ns.volume_node, predictor=ThresholdPredictor(THRESHOLD))
    prompts = ns.logic.prompts_from_nodes(ns.points)
    before = set(ns.segmentation.GetSegmentation().GetSegmentIDs())
    scores = ns.logic.segment(
        session, prompts, SegmentOptions(propagate=True), ns.segmentation, **kwargs
    )
    after = set(ns.segmentation.GetSegmentation().GetSegmentIDs())
    segment_id = kwargs.get("segment_id") or (after - before).pop()
    return segment_id, scores


def on_grid(ns, segment_id) -> np.ndarray:
    return segment_on_grid(ns.scene, ns.segmentation, segment_id, ns.volume_node)


def add_segment(ns, name: str, mask: np.ndarray) -> str:
    segment_id = ns.segmentation.GetSegmentation().AddEmptySegment(name, name)
    assert segment_id == name
    ns.scene.slicer.util.updateSegmentBinaryLabelmapFromArray(
        mask.astype(np.uint8), ns.segmentation, segment_id, ns.volume_node
    )
    return segment_id


def test_module_metadata_without_qt():
    parent = types.SimpleNamespace()
    module.RobustMedSAM(parent)
    assert parent.categories == ["Segmentation"] and "MedSAM" in parent.helpText


def test_volume_from_node_keeps_oblique_geometry_and_parent_transform(slicer_scene):
    logic = module.RobustMedSAMLogic()
    array = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    node = add_volume(slicer_scene, array, oblique_matrix())

    volume = logic.volume_from_node(node)
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.ijk_to_ras, oblique_matrix(), atol=1e-9)

    to_parent = np.eye(4)
    to_parent[:3, :3] = Rotation.from_euler("x", 30, degrees=True).as_matrix()
    to_parent[:3, 3] = [5.0, -7.0, 11.0]
    transform = slicer_scene.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(vtk_matrix(to_parent))
    node.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_allclose(
        logic.volume_from_node(node).ijk_to_ras, to_parent @ oblique_matrix(), atol=1e-9
    )
    with pytest.raises(InputError, match="scalar volume"):
        logic.volume_from_node(None)


def test_prompts_are_world_ras_of_placed_points_and_roi(slicer_scene):
    logic = module.RobustMedSAMLogic()
    positive = np.array([[1.0, 2.0, 3.0], [-4.5, 6.0, 7.25]])
    pos_node = point_list(slicer_scene, positive)
    pos_node.AddControlPoint([0.0, 0.0, 0.0], "not placed")
    pos_node.SetNthControlPointPositionMissing(2)
    neg_node = point_list(slicer_scene, [[9.0, 8.0, 7.0]], "N")
    roi_node = slicer_scene.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi_node.SetSize(4, 6, 8)
    roi_node.SetCenter(10, -20, 30)
    shift = np.eye(4)
    shift[:3, :3] = Rotation.from_euler("z", 90, degrees=True).as_matrix()
    shift[:3, 3] = [1.0, 1.0, 1.0]
    transform = slicer_scene.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(vtk_matrix(shift))
    roi_node.SetAndObserveTransformNodeID(transform.GetID())

    prompts = logic.prompts_from_nodes(pos_node, neg_node, roi_node)
    np.testing.assert_allclose(prompts.positive, positive, atol=1e-9)
    np.testing.assert_allclose(prompts.negative, [[9.0, 8.0, 7.0]], atol=1e-9)
    np.testing.assert_allclose(prompts.roi.center_ras, [21.0, 11.0, 31.0], atol=1e-9)
    np.testing.assert_allclose(prompts.roi.size, [4, 6, 8], atol=1e-9)
    np.testing.assert_allclose(prompts.roi.axes_ras, shift[:3, :3], atol=1e-9)
    assert logic.prompts_from_nodes(None, None, None).positive is None


def test_one_point_segments_the_sphere_into_a_new_segment(phantom_scene):
    ns = phantom_scene
    segment_id, scores = run(ns, segment_name="sphere")
    segment = ns.segmentation.GetSegmentation().GetSegment(segment_id)
    assert segment is not None and segment.GetName() == "sphere"
    assert dice(on_grid(ns, segment_id), ns.phantom.mask) >= 0.9
    assert len(scores) >= 10 and all(s.score > 0 for s in scores)


def test_cancel_writes_nothing(phantom_scene):
    ns = phantom_scene
    with pytest.raises(CancelledError):
        run(ns, cancel=lambda: True)
    assert ns.segmentation.GetSegmentation().GetNumberOfSegments() == 0


def test_undo_restores_the_previous_mask_exactly(phantom_scene):
    ns = phantom_scene
    previous = np.zeros(ns.phantom.mask.shape, bool)
    previous[2:6, 3:30, 5:12] = True
    segment_id = add_segment(ns, "target", previous)

    run(ns, segment_id=segment_id)
    assert dice(on_grid(ns, segment_id), ns.phantom.mask) >= 0.9
    assert ns.logic.undo_last(ns.segmentation)
    np.testing.assert_array_equal(on_grid(ns, segment_id), previous)

    created, _ = run(ns)
    assert ns.logic.undo_last(ns.segmentation)
    assert ns.segmentation.GetSegmentation().GetSegment(created) is None
    assert not ns.logic.undo_last(ns.segmentation)


def test_without_overwrite_other_segments_keep_their_voxels(phantom_scene):
    ns = phantom_scene
    other = np.zeros(ns.phantom.mask.shape, bool)
    other[:, 15:25, :] = True  # a slab through the sphere
    other_id = add_segment(ns, "other", other)

    segment_id, _ = run(ns, overwrite_other_segments=False)
    np.testing.assert_array_equal(on_grid(ns, other_id), other)
    written = on_grid(ns, segment_id)
    assert not (written & other).any()
    assert dice(written, ns.phantom.mask & ~other) >= 0.9


def test_overwrite_removes_the_new_voxels_from_other_segments_and_undo_puts_them_back(
    phantom_scene,
):
    ns = phantom_scene
    other = np.zeros(ns.phantom.mask.shape, bool)
    other[:, 15:25, :] = True
    other_id = add_segment(ns, "other", other)

    segment_id, _ = run(ns, overwrite_other_segments=True)
    written = on_grid(ns, segment_id)
    assert dice(written, ns.phantom.mask) >= 0.9
    np.testing.assert_array_equal(on_grid(ns, other_id), other & ~written)

    assert ns.logic.undo_last(ns.segmentation)
    np.testing.assert_array_equal(on_grid(ns, other_id), other)
    assert ns.segmentation.GetSegmentation().GetSegment(segment_id) is None


def test_editable_mask_limits_the_change(phantom_scene):
    ns = phantom_scene
    previous = np.zeros(ns.phantom.mask.shape, bool)
    previous[0:3, 0:5, 0:5] = True  # outside the editable area: must stay
    segment_id = add_segment(ns, "target", previous)
    editable = np.zeros(ns.phantom.mask.shape, bool)
    editable[12:, :, :] = True

    run(ns, segment_id=segment_id, editable_mask=editable)
    written = on_grid(ns, segment_id)
    np.testing.assert_array_equal(written[:12], previous[:12])
    assert dice(written[12:], ns.phantom.mask[12:]) >= 0.9
    with pytest.raises(InputError, match="shape"):
        run(ns, segment_id=segment_id, editable_mask=editable[1:])


def test_save_writes_a_seg_nrrd_that_reads_back(phantom_scene, tmp_path):
    ns = phantom_scene
    segment_id, _ = run(ns, segment_name="sphere")
    expected = on_grid(ns, segment_id)
    path = ns.logic.save_segmentation(ns.segmentation, tmp_path / "out.seg.nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.seg.nrrd"]

    loaded = segmentation_node_from_file(ns.scene, path)
    loaded_id = loaded.GetSegmentation().GetSegmentIdBySegmentName("sphere")
    mask = segment_on_grid(ns.scene, loaded, loaded_id, ns.volume_node)
    np.testing.assert_array_equal(mask, expected)

    with pytest.raises(InputError, match=r"\.seg\.nrrd"):
        ns.logic.save_segmentation(ns.segmentation, tmp_path / "out.nii.gz")
    assert not (tmp_path / "out.nii.gz").exists()


def test_segment_of_a_transformed_volume_lies_where_the_volume_is_shown(phantom_scene):
    ns = phantom_scene
    to_world = np.eye(4)
    to_world[:3, 3] = [40.0, -25.0, 10.0]
    transform = ns.scene.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(vtk_matrix(to_world))
    ns.volume_node.SetAndObserveTransformNodeID(transform.GetID())
    mask = np.zeros(ns.phantom.mask.shape, bool)
    mask[7, 9, 11] = True

    segment_id = ns.logic.write_mask(ns.segmentation, ns.volume_node, mask)
    image = ns.segmentation.GetBinaryLabelmapInternalRepresentation(segment_id)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    internal = ns.scene.slicer.util.arrayFromSegmentInternalBinaryLabelmap(
        ns.segmentation, segment_id
    )
    ijk = np.argwhere(internal > 0)[0][::-1] + np.array(image.GetExtent()[::2])
    world = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    expected = to_world @ oblique_matrix() @ np.array([11, 9, 7, 1.0])
    np.testing.assert_allclose(world @ np.r_[ijk, 1.0], expected, atol=1e-6)
