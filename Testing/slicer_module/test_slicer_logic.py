"""The Slicer module's Logic on real MRML nodes (slicer-core, headless).

slicer-core has no ``slicer.ScriptedLoadableModule`` nor ``slicer.parameterNodeWrapper``
(they need Qt); ``slicer_headless.load_module_file`` stubs them. Segmentation uses
``ThresholdPredictor``.
"""

from __future__ import annotations

import types

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
import vtk  # noqa: E402
from doubles import (  # noqa: E402
    BoxBlobPredictor,
    KeepsBoxes,
    RecordsMaskInputs,
    ThresholdPredictor,
)
from scipy.spatial.transform import Rotation  # noqa: E402
from slicer_headless import (  # noqa: E402  # noqa: E402
    add_volume,
    helper_module,
    load_module_file,
    segment_on_grid,
    segmentation_node_from_file,
    slicer_scene_fixture,
    vtk_matrix,
)

from RobustMedSAMLib.datasets.phantoms import sphere  # noqa: E402
from RobustMedSAMLib.errors import CancelledError, InputError  # noqa: E402
from RobustMedSAMLib.inference.segment_volume import (  # noqa: E402
    SegmentOptions,
    VolumePrompts,
    grow_box,
)
from RobustMedSAMLib.inference.slicing import (  # noqa: E402
    get_slice,
    ijk_box_roi,
    roi_to_slice_box,
    slice_box_roi,
    slice_centre_ras,
)
from RobustMedSAMLib.inference.types import SliceResult  # noqa: E402
from RobustMedSAMLib.names import SEED_BOX_GROWTH  # noqa: E402

slicer_scene = pytest.fixture(slicer_scene_fixture)
THRESHOLD = 80.0  # HU between the phantom's background (40) and sphere (120)


module = load_module_file()
slice_box = helper_module("mrml").slice_box


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


def test_without_overwrite_segments_overlap_as_slicer_allows(phantom_scene):
    """Slicer's "Allow overlap" (OverwriteNone): the other segment keeps its voxels and
    the new one is not clipped by it (vtkSlicerSegmentEditorLogic.cxx, segmentIDsToOverwrite
    empty; qMRMLSegmentEditorWidget labels it "Allow overlap")."""
    ns = phantom_scene
    other = np.zeros(ns.phantom.mask.shape, bool)
    other[:, 15:25, :] = True  # a slab through the sphere
    other_id = add_segment(ns, "other", other)

    segment_id, _ = run(ns, overwrite_other_segments=False)
    np.testing.assert_array_equal(on_grid(ns, other_id), other)
    written = on_grid(ns, segment_id)
    assert (written & other).sum() >= 0.9 * (ns.phantom.mask & other).sum()
    assert dice(written, ns.phantom.mask) >= 0.9


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


def editor_node(ns, **settings):
    node = ns.scene.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    for name, value in settings.items():
        getattr(node, f"Set{name}")(value)
    return node


def test_segment_editor_inside_a_segment_limits_the_editable_area(phantom_scene):
    ns = phantom_scene
    region = np.zeros(ns.phantom.mask.shape, bool)
    region[:, :, :20] = True  # half the volume
    region_id = add_segment(ns, "region", region)
    editor = editor_node(ns, MaskMode=slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    editor.SetMaskSegmentID(region_id)

    masking = ns.logic.editor_masking(editor, ns.segmentation, ns.volume_node)
    np.testing.assert_array_equal(masking.editable_mask, region)
    assert masking.overwrite_other_segments is True  # the editor's default: overwrite all
    segment_id, _ = run(
        ns,
        editable_mask=masking.editable_mask,
        overwrite_other_segments=masking.overwrite_other_segments,
    )
    written = on_grid(ns, segment_id)
    assert not written[~region].any()
    assert dice(written, ns.phantom.mask & region) >= 0.9


def test_segment_editor_outside_segments_and_intensity_range(phantom_scene):
    ns = phantom_scene
    other = np.zeros(ns.phantom.mask.shape, bool)
    other[:, 15:25, :] = True
    other_id = add_segment(ns, "other", other)
    editor = editor_node(
        ns,
        MaskMode=slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments,
        SourceVolumeIntensityMask=True,
        SourceVolumeIntensityMaskRange=(100.0, 1000.0),
    )
    masking = ns.logic.editor_masking(editor, ns.segmentation, ns.volume_node)
    image = ns.phantom.image
    np.testing.assert_array_equal(masking.editable_mask, ~other & (image >= 100) & (image <= 1000))
    # the edited segment itself is always editable, even where it lies "inside" a segment
    inside = ns.logic.editor_masking(editor, ns.segmentation, ns.volume_node, other_id)
    assert inside.editable_mask[other & (image >= 100)].all()


def test_segment_editor_overwrite_visible_segments_only(phantom_scene):
    ns = phantom_scene
    slab = np.zeros(ns.phantom.mask.shape, bool)
    slab[:, 15:25, :] = True
    shown_id, hidden_id = add_segment(ns, "shown", slab), add_segment(ns, "hidden", slab)
    ns.segmentation.CreateDefaultDisplayNodes()
    ns.segmentation.GetDisplayNode().SetSegmentVisibility(hidden_id, False)
    editor = editor_node(ns, OverwriteMode=slicer.vtkMRMLSegmentEditorNode.OverwriteVisibleSegments)

    masking = ns.logic.editor_masking(editor, ns.segmentation, ns.volume_node)
    assert masking.editable_mask is None
    assert masking.overwrite_other_segments == frozenset({shown_id})
    segment_id, _ = run(ns, overwrite_other_segments=masking.overwrite_other_segments)
    written = on_grid(ns, segment_id)
    np.testing.assert_array_equal(on_grid(ns, hidden_id), slab)  # hidden: kept
    np.testing.assert_array_equal(on_grid(ns, shown_id), slab & ~written)  # visible: overwritten
    assert dice(written, ns.phantom.mask) >= 0.9  # and overlapping the hidden one, as in Slicer
    assert (written & slab).any()
    none = editor_node(ns, OverwriteMode=slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    masking = ns.logic.editor_masking(none, ns.segmentation, ns.volume_node)
    assert masking.overwrite_other_segments is False


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


# --- additions for the panel: per-slice clicks, background work, confidence, preview ---


def session_of(ns, axis="axial"):
    return ns.logic.start_session(
        ns.volume_node, predictor=ThresholdPredictor(THRESHOLD), axis=axis
    )


def test_a_click_segments_its_slice_only_and_undo_restores_it(phantom_scene):
    ns = phantom_scene
    previous = np.zeros(ns.phantom.mask.shape, bool)
    previous[1:4, 2:8, 2:8] = True  # on other slices: must stay
    segment_id = add_segment(ns, "target", previous)
    session = session_of(ns)
    prompts = ns.logic.prompts_from_nodes(ns.points)
    index = ns.logic.slice_of_point(session, ns.points.GetNthControlPointPositionWorld(0))

    result = ns.logic.compute_slice(session, prompts, index)
    assert result.score > 0.5
    ns.logic.write_slice(session, result, ns.segmentation, segment_id)
    written = on_grid(ns, segment_id)
    from RobustMedSAMLib.inference.slicing import get_slice

    truth = get_slice(ns.phantom.mask, session.axis, index)
    assert dice(get_slice(written, session.axis, index), truth) >= 0.9
    others = np.ones(written.shape, bool)
    others[(slice(None),) * session.axis + (index,)] = False
    np.testing.assert_array_equal(written[others], previous[others])

    assert ns.logic.undo_last(ns.segmentation)
    np.testing.assert_array_equal(on_grid(ns, segment_id), previous)


def test_a_point_on_a_slice_with_a_box_only_model_finds_the_structure(slicer_scene):
    """``compute_slice`` (the console's ``segment_slice``) sends a point through the point
    search, as the panel's server does; before, a box-only model got the point alone
    (an empty mask here; LiteMedSAM: Dice about 0.06 in 2D)."""
    phantom = sphere((20, 64, 64), (1.0, 1.0, 2.0), 9.0, contrast=150.0, noise=10.0)
    matrix = np.diag([1.0, 1.0, 2.0, 1.0])
    node = add_volume(slicer_scene, phantom.image, matrix, "sphere")
    logic = module.RobustMedSAMLogic()
    session = logic.start_session(node, predictor=BoxBlobPredictor(115.0), window=(-160.0, 240.0))
    centre_kji = np.argwhere(phantom.mask).mean(axis=0).round()
    centre_ras = matrix[:3, :3] @ centre_kji[::-1] + matrix[:3, 3]
    prompts = logic.prompts_from_nodes(point_list(slicer_scene, [centre_ras]))
    index = logic.slice_of_point(session, centre_ras)
    result = logic.compute_slice(session, prompts, index)
    from RobustMedSAMLib.inference.slicing import get_slice

    truth = get_slice(phantom.mask, session.axis, index)
    assert dice(get_slice(result.mask, session.axis, index), truth) > 0.9


def test_a_slice_without_an_include_point_is_refused_clearly(phantom_scene):
    ns = phantom_scene
    session = session_of(ns)
    prompts = ns.logic.prompts_from_nodes(ns.points)
    with pytest.raises(InputError, match="slice 0 has no include point"):
        ns.logic.compute_slice(session, prompts, 0)
    box = np.array([10.0, 10.0, 30.0, 30.0])
    elsewhere = slice_box_roi(session.volume, session.axis, 5, box)  # a box on slice 5
    with pytest.raises(InputError, match="slice 0 has no include point and no ROI"):
        ns.logic.compute_slice(session, VolumePrompts(roi=elsewhere), 0)


class BoxOnlyRecorder(KeepsBoxes, RecordsMaskInputs, BoxBlobPredictor):
    """A box-only model (as the lite models) recording its asks."""


class ThresholdRecorder(KeepsBoxes, RecordsMaskInputs, ThresholdPredictor):
    """A model taking points, boxes and masks, recording its asks."""


def test_a_console_correction_after_a_point_keeps_the_searched_box_and_mask(slicer_scene):
    """An exclude point added from the console to a slice's include point (a correction
    click) goes with the box the point search found and that slice's last mask, in one
    ask, as the panel's server does; before, ``compute_slice`` searched again per click,
    which on phantoms took robustmedsam-lite from 0.945 to 0.60-0.72 over three clicks
    (docs/slicer.md, "Correction clicks")."""
    phantom = sphere((20, 64, 64), (1.0, 1.0, 2.0), 9.0, contrast=150.0, noise=10.0)
    matrix = np.diag([1.0, 1.0, 2.0, 1.0])
    node = add_volume(slicer_scene, phantom.image, matrix, "sphere")
    logic = module.RobustMedSAMLogic()
    model = BoxOnlyRecorder(115.0)
    session = logic.start_session(node, predictor=model, window=(-160.0, 240.0))
    k, j, i = np.argwhere(phantom.mask).mean(axis=0).round()
    include = (matrix @ [i, j, k, 1.0])[None, :3]
    exclude = (matrix @ [2.0, 2.0, k, 1.0])[None, :3]  # background, far from the sphere
    index = logic.slice_of_point(session, include[0])
    truth = get_slice(phantom.mask, session.axis, index)

    first = logic.compute_slice(session, VolumePrompts(positive=include), index)
    searched = model.boxes[-1]  # the last ask: the searched box, no mask yet
    assert model.mask_inputs[-1] is False
    model.mask_inputs.clear()
    model.boxes.clear()
    again = logic.compute_slice(session, VolumePrompts(include, exclude), index)

    assert model.mask_inputs == [True]  # one ask, with the last mask: no new search
    np.testing.assert_allclose(model.boxes[0], searched)
    assert dice(get_slice(first.mask, session.axis, index), truth) > 0.9
    # the double overflows a fed-back mask by 2 px, as LiteMedSAM did: the sphere stays in
    assert (get_slice(again.mask, session.axis, index) & truth).sum() > 0.9 * truth.sum()
    assert not np.delete(again.mask, index, axis=session.axis).any()  # that slice only


def test_a_point_added_to_a_box_on_a_slice_feeds_back_the_last_mask(phantom_scene):
    """A 3D ROI and an include point added on one slice from the console: the ROI is
    flattened onto the slice and grown, as the panel sends and the server grows it, and
    the point refines that slice's last mask; on another slice the ROI starts afresh.
    Before, the footprint went to the model bare each time (no growth, no mask)."""
    ns = phantom_scene
    model = ThresholdRecorder(THRESHOLD)
    session = ns.logic.start_session(ns.volume_node, predictor=model)
    inside = np.argwhere(ns.phantom.mask)[:, ::-1]  # (i, j, k)
    roi = ijk_box_roi(session.volume, inside.min(0) - 1.5, inside.max(0) + 1.5)
    centre = np.array(ns.points.GetNthControlPointPositionWorld(0))
    index = ns.logic.slice_of_point(session, centre)

    ns.logic.compute_slice(session, VolumePrompts(roi=roi), index)
    ns.logic.compute_slice(session, VolumePrompts(centre[None], roi=roi), index)
    ns.logic.compute_slice(session, VolumePrompts(roi=roi), index + 1)

    assert model.mask_inputs == [False, True, False]
    _, footprint = roi_to_slice_box(session.volume, session.axis, roi)
    grown = grow_box(footprint, SEED_BOX_GROWTH, session.slice_image(index).shape)
    np.testing.assert_allclose(model.boxes[0], grown, atol=1e-4)
    np.testing.assert_allclose(model.boxes[1], grown, atol=1e-4)  # the same box, + a point


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_slice_centre_lies_on_its_slice_in_every_view(phantom_scene, axis):
    ns = phantom_scene
    session = session_of(ns, axis)
    for index in (0, session.n_slices // 2, session.n_slices - 1):
        centre = slice_centre_ras(session.volume, session.axis, index)
        assert ns.logic.slice_of_point(session, centre) == index


def test_encoding_runs_nearest_first_within_the_cache_and_cancels(phantom_scene):
    ns = phantom_scene
    assert module.RobustMedSAMLogic.encoding_order(5, 1) == [1, 2, 0, 3, 4]
    session = session_of(ns)
    per_slice = session.predictor.encode(session.slice_image(0)).features.nbytes
    session.cache_bytes = 5 * per_slice
    seen = []
    order = ns.logic.encode_ahead(session, 10, lambda done, total: seen.append((done, total)))
    assert order == [10, 11, 9, 12, 8]
    assert session.stats.encoded == order and seen[-1] == (5, 5)

    calls = iter([False, False, True])
    with pytest.raises(CancelledError):
        ns.logic.encode_ahead(session_of(ns), 3, cancel=lambda: next(calls))


def test_corrupted_copy_keeps_geometry_and_leaves_the_original_untouched(phantom_scene):
    ns = phantom_scene
    transform = ns.scene.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    ns.volume_node.SetAndObserveTransformNodeID(transform.GetID())
    before = ns.scene.slicer.util.arrayFromVolume(ns.volume_node).copy()

    copy = ns.logic.corrupted_copy(ns.volume_node, "gaussian_noise", 4, seed=3)
    original, corrupted = ns.logic.volume_from_node(ns.volume_node), ns.logic.volume_from_node(copy)
    np.testing.assert_array_equal(ns.scene.slicer.util.arrayFromVolume(ns.volume_node), before)
    np.testing.assert_allclose(corrupted.ijk_to_ras, original.ijk_to_ras, atol=1e-9)
    assert copy.GetTransformNodeID() == transform.GetID()
    assert corrupted.array.shape == before.shape and corrupted.array.dtype == before.dtype
    assert np.abs(corrupted.array.astype(float) - before).mean() > 1.0
    assert copy.GetName() == "phantom gaussian_noise s4"
    with pytest.raises(InputError, match="severity"):
        ns.logic.corrupted_copy(ns.volume_node, "gaussian_noise", 9)


def test_preview_compares_clean_and_corrupted_masks_and_writes_both(phantom_scene):
    from RobustMedSAMLib.evaluation.metrics import dice as library_dice
    from RobustMedSAMLib.inference.segment_volume import SegmentOptions

    ns = phantom_scene
    clean = session_of(ns)
    prompts = ns.logic.prompts_from_nodes(ns.points)
    copy = ns.logic.corrupted_copy(ns.volume_node, "gaussian_noise", 5, seed=1)
    corrupted = ns.logic.preview_session(clean, copy)
    assert corrupted.window == clean.window and corrupted.axis == clean.axis

    seen = []
    comparison = ns.logic.compare(
        clean, corrupted, prompts, SegmentOptions(propagate=True), lambda d, t: seen.append(d)
    )
    assert seen[-1] == 200 and seen == sorted(seen)
    assert comparison.dice == library_dice(comparison.clean_mask, comparison.corrupted_mask)
    assert 0.0 < comparison.dice < 1.0  # heavy noise changes the threshold double's mask
    assert dice(comparison.clean_mask, ns.phantom.mask) >= 0.9

    clean_node, corrupted_node = ns.logic.write_preview(clean, corrupted, comparison)
    for node, mask in (
        (clean_node, comparison.clean_mask),
        (corrupted_node, comparison.corrupted_mask),
    ):
        segment_id = node.GetSegmentation().GetSegmentIDs()[0]
        np.testing.assert_array_equal(
            segment_on_grid(ns.scene, node, segment_id, ns.volume_node), mask
        )
    again = ns.logic.write_preview(clean, corrupted, comparison)
    assert again == (clean_node, corrupted_node)  # reused, not piled up
    assert clean_node.GetSegmentation().GetNumberOfSegments() == 1


def test_segment_mask_reads_the_segment_on_the_volume_grid(phantom_scene):
    ns = phantom_scene
    segment_id, _ = run(ns)
    np.testing.assert_array_equal(
        ns.logic.segment_mask(ns.segmentation, segment_id, ns.volume_node), on_grid(ns, segment_id)
    )
    with pytest.raises(InputError, match="no segment 'missing'"):
        ns.logic.segment_mask(ns.segmentation, "missing", ns.volume_node)


def test_scene_segments_are_found_and_exported_for_fine_tuning(phantom_scene, tmp_path):
    ns = phantom_scene
    segment_id, _ = run(ns, segment_name="sphere")
    pairs = ns.logic.training_pairs_in_scene()
    assert [(v.GetID(), s.GetID(), i) for v, s, i in pairs] == [
        (ns.volume_node.GetID(), ns.segmentation.GetID(), segment_id)
    ]
    pytest.importorskip("RobustMedSAMLib.training.export")
    ((image_path, label_path),) = ns.logic.export_scene_training_data(tmp_path)
    from RobustMedSAMLib.formats.volume import read_volume

    image, labels = read_volume(image_path), read_volume(label_path)
    np.testing.assert_array_equal(image.array, ns.phantom.image)
    np.testing.assert_array_equal(labels.array > 0, on_grid(ns, segment_id))
    np.testing.assert_allclose(labels.ijk_to_ras, oblique_matrix(), atol=1e-4)


@pytest.mark.parametrize("name", ["../../x", "..", "a/../../b", "C:\\evil", ".hidden"])
def test_a_segment_name_cannot_lead_an_export_out_of_its_folder(phantom_scene, tmp_path, name):
    ns = phantom_scene
    segment_id, _ = run(ns, segment_name=name)
    ns.volume_node.SetName("")
    folder = tmp_path / "a" / "b" / "data"
    pytest.importorskip("RobustMedSAMLib.training.export")
    try:
        ns.logic.export_training_pair(ns.volume_node, ns.segmentation, segment_id, folder)
    except InputError as error:  # a name with nothing usable in it
        assert "file name" in str(error)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(folder in p.parents for p in written), written
    with pytest.raises(InputError, match="file name"):  # given as the file name itself
        ns.logic.export_training_pair(ns.volume_node, ns.segmentation, segment_id, folder, name)


def test_no_segment_in_the_scene_is_a_clear_error(slicer_scene, tmp_path):
    with pytest.raises(InputError, match="no segmentation in the scene"):
        module.RobustMedSAMLogic().export_scene_training_data(tmp_path)


def test_finetune_config_reads_the_exported_data(slicer_scene, tmp_path):
    import tomllib

    pytest.importorskip("RobustMedSAMLib.training.export")
    data = tmp_path / "data"
    data.mkdir()
    path = module.RobustMedSAMLogic.write_finetune_config(tmp_path / "run.toml", data, steps=7)
    text = path.read_text()
    assert str(data) in text and tomllib.loads(text)


def test_session_uses_the_window_the_volume_is_displayed_with(phantom_scene):
    ns = phantom_scene
    ns.volume_node.CreateDefaultDisplayNodes()
    display = ns.volume_node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevel(300.0, 50.0)  # width, level: -100..200
    session = ns.logic.start_session(ns.volume_node, predictor=ThresholdPredictor(THRESHOLD))
    assert session.window == (-100.0, 200.0) and session.window_source == "display"
    explicit = ns.logic.start_session(
        ns.volume_node, predictor=ThresholdPredictor(THRESHOLD), window="brain"
    )
    assert explicit.window == (0.0, 80.0)


def slice_result(ns, index: int, mask2d: np.ndarray, axis: int = 0):
    mask = np.zeros(ns.phantom.mask.shape, bool)
    mask[(slice(None),) * axis + (index,)] = mask2d
    return SliceResult(index, axis, mask, 1.0)


def test_undo_is_forgotten_when_the_scene_closes_and_ids_are_reused(phantom_scene):
    """MRML reuses node IDs after Clear(): a new scene's node must not inherit undo."""
    ns = phantom_scene
    run(ns)
    old_id = ns.segmentation.GetID()
    assert ns.logic.can_undo(ns.segmentation)
    ns.scene.scene.Clear(0)
    fresh = ns.scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    assert fresh.GetID() == old_id  # the reuse that made an ID-keyed stack wrong
    assert not ns.logic.can_undo(fresh) and not ns.logic.undo_last(fresh)


def test_undo_is_forgotten_when_the_node_is_removed(phantom_scene):
    ns = phantom_scene
    run(ns)
    ns.scene.scene.RemoveNode(ns.segmentation)
    assert not ns.logic._undo  # no snapshot (nor node) kept alive


def test_slice_writes_keep_capped_undo_cropped_to_the_slice(phantom_scene):
    ns = phantom_scene
    session = session_of(ns)
    shape = ns.phantom.mask.shape
    square = np.zeros(shape[1:], bool)
    square[10:20, 10:20] = True
    steps = ns.logic.UNDO_STEPS
    segment_id = None
    for index in range(steps + 3):
        segment_id = ns.logic.write_slice(
            session, slice_result(ns, index, square), ns.segmentation, segment_id
        )
    stack = ns.logic._undo[ns.segmentation]
    assert len(stack) == steps
    assert all(s.nbytes <= shape[1] * shape[2] for s in stack)  # one slice each, at most
    for _ in range(steps):
        assert ns.logic.undo_last(ns.segmentation)
    assert not ns.logic.undo_last(ns.segmentation)
    written = on_grid(ns, segment_id)
    assert written[:3].any() and not written[3:].any()  # the 3 oldest writes were dropped


def test_slice_write_overwrites_other_layers_on_that_slice_only_and_undo_restores(phantom_scene):
    ns = phantom_scene
    shape = ns.phantom.mask.shape
    slab = np.zeros(shape, bool)
    slab[:, 15:25, :] = True
    block = np.zeros(shape, bool)
    block[:, :, 0:12] = True
    slab_id, block_id = add_segment(ns, "slab", slab), add_segment(ns, "block", block)
    ns.segmentation.GetSegmentation().SeparateSegmentLabelmap(block_id)  # another layer
    session = session_of(ns)
    square = np.zeros(shape[1:], bool)
    square[5:30, 5:30] = True
    segment_id = ns.logic.write_slice(
        session, slice_result(ns, 7, square), ns.segmentation, None, True
    )
    expected_slab, expected_block = slab.copy(), block.copy()
    expected_slab[7] &= ~square
    expected_block[7] &= ~square
    np.testing.assert_array_equal(on_grid(ns, slab_id), expected_slab)
    np.testing.assert_array_equal(on_grid(ns, block_id), expected_block)
    np.testing.assert_array_equal(on_grid(ns, segment_id)[7], square)
    assert ns.logic.undo_last(ns.segmentation)
    np.testing.assert_array_equal(on_grid(ns, slab_id), slab)
    np.testing.assert_array_equal(on_grid(ns, block_id), block)
    assert ns.segmentation.GetSegmentation().GetSegment(segment_id) is None


def test_editor_intensity_range_applies_to_the_editors_source_volume(phantom_scene):
    ns = phantom_scene
    editor = editor_node(ns, SourceVolumeIntensityMask=True)
    editor.SetSourceVolumeIntensityMaskRange(100.0, 1000.0)
    inverted = add_volume(ns.scene, (200 - ns.phantom.image).astype(np.int16), oblique_matrix())
    editor.SetAndObserveSourceVolumeNode(inverted)
    masking = ns.logic.editor_masking(editor, ns.segmentation, ns.volume_node)
    source = 200 - ns.phantom.image
    np.testing.assert_array_equal(masking.editable_mask, (source >= 100) & (source <= 1000))
    box = slice_box(ns.phantom.mask.shape, 0, 5)
    on_slice = ns.logic.editor_masking(editor, ns.segmentation, ns.volume_node, box=box)
    np.testing.assert_array_equal(on_slice.editable_mask, masking.editable_mask[box])
    elsewhere = add_volume(ns.scene, np.zeros((3, 4, 5), np.int16), np.eye(4), "small")
    editor.SetAndObserveSourceVolumeNode(elsewhere)
    with pytest.raises(InputError, match="source volume 'small'"):
        ns.logic.editor_masking(editor, ns.segmentation, ns.volume_node)
