"""The RobustMedSAM Segment Editor effect, headless.

What is real: the effect file (loaded by path as Slicer loads it), MRML, and the Segment
Editor's own logic (``vtkSlicerSegmentEditorLogic``: masking, overwrite modes, undo
history), to which Slicer's C++ effect adaptor hands every write. What is a stand-in:
the thin adaptor itself and Qt (``slicer_headless``), and the model requests
(``LocalRequests``: the library with ``ThresholdPredictor`` in-process, answering on a
later pump of the main loop as the server link does).
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import vtk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
from doubles import ThresholdPredictor  # noqa: E402
from slicer_headless import (  # noqa: E402
    FakeInteractor,
    FakeScriptedEffect,
    FakeSliceWidget,
    add_volume,
    helper_module,
    install_effect_stand_in,
    install_gui_stand_in,
    load_module_file,
    segment_editor,
    segment_on_grid,
    slicer_scene_fixture,
)

from RobustMedSAMLib.datasets.phantoms import sphere  # noqa: E402
from RobustMedSAMLib.inference.propagation import propagate  # noqa: E402
from RobustMedSAMLib.inference.session import SegmentationSession  # noqa: E402
from RobustMedSAMLib.inference.slicing import ras_to_slice_points  # noqa: E402
from RobustMedSAMLib.inference.types import SlicePrompt  # noqa: E402

module = load_module_file()
slicer_scene = pytest.fixture(slicer_scene_fixture)
THRESHOLD = 80.0  # HU between the phantom's background (40) and its ball (120)
MATRIX = np.array([[0.9, 0, 0, -12.0], [0, 0.8, 0, 7.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1]])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


class LocalRequests(module.RobustMedSAMLogic):
    """The Logic with ``request_slice`` / ``request_propagate`` answered by the library
    in-process (``ThresholdPredictor``); callbacks run on the next pump of the main loop.
    ``calls`` records each request's arguments."""

    def __init__(self, qt) -> None:
        super().__init__()
        self.qt, self.calls, self.handles = qt, [], []

    def _session(self, volume_node, axis: int) -> SegmentationSession:
        return SegmentationSession(
            self.volume_from_node(volume_node), ThresholdPredictor(THRESHOLD), axis
        )

    def _later(self, answer, on_done):
        handle = types.SimpleNamespace(cancelled=False)
        handle.cancel = lambda: setattr(handle, "cancelled", True)
        self.handles.append(handle)
        self.qt.QTimer.singleShot(0, lambda: None if handle.cancelled else on_done(*answer()))
        return handle

    def request_slice(
        self, volume_node, axis, index, points_ras, labels, box_ras, on_done, on_error
    ):
        self.calls.append(("slice", axis, index, np.array(points_ras), np.array(labels), box_ras))
        session = self._session(volume_node, axis)

        def answer():
            xy = np.zeros((0, 2))
            if len(points_ras):
                _, xy = ras_to_slice_points(session.volume, axis, points_ras)
            box = None
            if box_ras is not None:
                _, corners = ras_to_slice_points(session.volume, axis, box_ras)
                box = [*corners.min(axis=0), *corners.max(axis=0)]
            prediction = session.segment_slice(index, SlicePrompt(xy, labels, box))
            return prediction.mask, {"score": prediction.score}

        return self._later(answer, on_done)

    def request_propagate(
        self, volume_node, axis, index, seed_mask, options, on_progress, on_done, on_error
    ):
        self.calls.append(("propagate", axis, index, np.array(seed_mask)))
        session = self._session(volume_node, axis)

        def answer():
            stack = propagate(session, {index: seed_mask}, options, on_progress).mask
            return (slice(None),) * 3, np.moveaxis(stack, 0, axis), {"seed": index}

        return self._later(answer, on_done)


def make_editor(slicer_scene, monkeypatch, tmp_path, phantom) -> types.SimpleNamespace:
    """A scene with ``phantom``, a segmentation with an empty segment "organ", the Segment
    Editor on them, the module registered at startup and its effect bound to the editor
    (``ns.effect``: the adaptor, ``ns.py``: the Python effect, on the in-process double)."""
    gui = install_gui_stand_in(monkeypatch, str(tmp_path))
    stand_in = install_effect_stand_in(monkeypatch)
    scene = slicer_scene.scene
    volume = add_volume(slicer_scene, phantom.image, MATRIX, "phantom")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    organ = segmentation.GetSegmentation().AddEmptySegment("organ", "organ")
    node, editor_logic = segment_editor(scene, segmentation, volume, organ)

    module.RobustMedSAM(types.SimpleNamespace())  # Slicer creates the module at startup
    gui.app.emit("startupCompleted()")
    effect = stand_in.registered[0]
    effect.bind(editor_logic)
    py = effect.self()
    py.setupOptionsFrame()
    py.logic = LocalRequests(gui.qt)
    return types.SimpleNamespace(
        gui=gui, qt=gui.qt, scene=slicer_scene, volume=volume, segmentation=segmentation,
        organ=organ, node=node, logic=editor_logic, effect=effect, py=py, phantom=phantom,
        registered=stand_in.registered,
    )  # fmt: skip


@pytest.fixture
def editor(slicer_scene, monkeypatch, tmp_path):
    phantom = sphere((24, 40, 40), spacing=(0.9, 0.8, 2.0), radius=11.0)
    return make_editor(slicer_scene, monkeypatch, tmp_path, phantom)


def mask_of(ns, segment_id) -> np.ndarray:
    return segment_on_grid(ns.scene, ns.segmentation, segment_id, ns.volume)


def ras_of(kji) -> np.ndarray:
    return (MATRIX @ [*np.asarray(kji, float)[::-1], 1.0])[:3]


def centre_kji(ns) -> np.ndarray:
    return np.round(np.argwhere(ns.phantom.mask).mean(axis=0))


def add_segment(ns, name: str, mask: np.ndarray) -> str:
    segment_id = ns.segmentation.GetSegmentation().AddEmptySegment(name, name)
    slicer.util.updateSegmentBinaryLabelmapFromArray(
        mask.astype(np.uint8), ns.segmentation, segment_id, ns.volume
    )
    return segment_id


def click_centre(ns, k: int | None = None) -> int:
    """An include point at the ball's centre (on slice ``k``); the answer is written."""
    kji = centre_kji(ns)
    if k is not None:
        kji[0] = k
    ns.py.addPoint(ras_of(kji), include=True)
    ns.qt.pump()
    return int(kji[0])


def test_the_module_registers_the_effect_at_startup(editor):
    ns = editor
    assert [e.name for e in ns.registered] == ["RobustMedSAM"]
    assert ns.effect.python_source == str(module.EFFECT_FILE)
    assert ns.effect.perSegment and ns.effect.requireSegments
    assert ns.py.promptKind() == "include"  # the default parameter, on the editor node
    assert ns.node.GetAttribute("RobustMedSAM.PromptKind") == "include"
    labels = [w.text for w in ns.effect.options if not isinstance(w, tuple)]
    assert labels[:3] == ["Propagate", "Cancel", "Clear prompts"]
    clone = ns.py.clone()
    assert isinstance(clone, FakeScriptedEffect) and clone.python_source == str(module.EFFECT_FILE)
    ns.py.kindButtons["box"].click()
    assert ns.py.promptKind() == "box" and ns.py.kindButtons["box"].checked
    assert not ns.py.kindButtons["include"].checked


def test_a_point_replaces_its_slice_through_the_editor_as_one_undo_step(editor):
    ns = editor
    k = click_centre(ns)
    written = mask_of(ns, ns.organ)
    assert dice(written[k], ns.phantom.mask[k]) >= 0.95
    assert written.sum() == written[k].sum()  # that slice only
    assert ns.effect.writes == [(ns.organ, [0, 39, 0, 39, k, k])] * 2  # remove, add: the slice
    assert ns.logic.CanUndo()

    k2 = click_centre(ns, k + 2)  # another slice: the first one is kept
    both = mask_of(ns, ns.organ)
    np.testing.assert_array_equal(both[k], written[k])
    assert dice(both[k2], ns.phantom.mask[k2]) >= 0.95

    ns.logic.Undo()  # one step: the second slice only
    np.testing.assert_array_equal(mask_of(ns, ns.organ), written)
    ns.logic.Undo()
    assert not mask_of(ns, ns.organ).any()


def test_an_exclude_point_refines_the_slice_and_points_elsewhere_are_ignored(editor):
    ns = editor
    k = click_centre(ns)
    edge = np.argwhere(ns.phantom.mask[k])[0]  # a voxel of the ball on that slice
    ns.py.addPoint(ras_of([k, *edge]), include=False)
    ns.qt.pump()
    kind, axis, index, points, labels, box = ns.py.logic.calls[-1]
    assert (kind, axis, index, box) == ("slice", 0, k, None)
    assert labels.tolist() == [1, 0] and len(points) == 2

    ns.py.addPoint(ras_of([k + 3, *centre_kji(ns)[1:]]), include=True)
    assert ns.py.logic.calls[-1][4].tolist() == [1]  # slice k's points are not sent


def test_a_box_dragged_in_a_slice_view_segments_that_slice(editor):
    ns = editor
    k = int(centre_kji(ns)[0])
    red = ns.scene.scene.AddNewNodeByClass("vtkMRMLSliceNode")
    red.SetOrientation("Axial")
    red.SetDimensions(200, 200, 1)
    red.SetFieldOfView(60.0, 60.0, 1.0)
    red.JumpSliceByCentering(*ras_of(centre_kji(ns)))
    red.UpdateMatrices()
    view = FakeSliceWidget(red)
    rows, cols = np.nonzero(ns.phantom.mask[k])
    corners = [
        ras_of([k, rows.min() - 2, cols.min() - 2]),
        ras_of([k, rows.max() + 2, cols.max() + 2]),
    ]
    ras_to_xy = np.linalg.inv(
        np.array([[red.GetXYToRAS().GetElement(r, c) for c in range(4)] for r in range(4)])
    )
    xys = [np.round((ras_to_xy @ [*c, 1.0])[:2]) for c in corners]
    ns.py.setPromptKind("box")
    press, release = (
        vtk.vtkCommand.LeftButtonPressEvent,
        vtk.vtkCommand.LeftButtonReleaseEvent,
    )
    assert not ns.py.processInteractionEvents(FakeInteractor(xys[0], shift=True), press, view)
    assert ns.py.processInteractionEvents(FakeInteractor(xys[0]), press, view)
    assert ns.py.processInteractionEvents(FakeInteractor(xys[1]), release, view)
    ns.qt.pump()
    kind, axis, index, points, labels, box = ns.py.logic.calls[-1]
    assert (kind, axis, index, len(points)) == ("slice", 0, k, 0)
    written = mask_of(ns, ns.organ)
    assert dice(written[k], ns.phantom.mask[k]) >= 0.95 and written.sum() == written[k].sum()


@pytest.mark.parametrize("mode", ["all", "visible", "none"])
def test_the_editors_overwrite_mode_decides_what_other_segments_keep(editor, mode):
    ns = editor
    k = int(centre_kji(ns)[0])
    half = np.zeros(ns.phantom.mask.shape, bool)
    half[:, :, :20] = True  # the left half of every slice, other slices too
    shown, hidden = add_segment(ns, "shown", half), add_segment(ns, "hidden", half)
    ns.segmentation.GetDisplayNode().SetSegmentVisibility(hidden, False)
    editor_node = slicer.vtkMRMLSegmentEditorNode
    ns.node.SetOverwriteMode(
        {
            "all": editor_node.OverwriteAllSegments,
            "visible": editor_node.OverwriteVisibleSegments,
            "none": editor_node.OverwriteNone,
        }[mode]
    )
    click_centre(ns)
    ours = mask_of(ns, ns.organ)
    assert dice(ours[k], ns.phantom.mask[k]) >= 0.95  # never clipped by the others
    taken = half & ours
    for segment_id, overwritten in (
        (shown, mode in ("all", "visible")),
        (hidden, mode == "all"),
    ):
        expected = half & ~taken if overwritten else half
        np.testing.assert_array_equal(mask_of(ns, segment_id), expected)
    ns.logic.Undo()  # one step restores every segment
    for segment_id in (shown, hidden):
        np.testing.assert_array_equal(mask_of(ns, segment_id), half)
    assert not mask_of(ns, ns.organ).any()


def test_the_editors_editable_area_and_intensity_range_limit_the_slice(editor):
    ns = editor
    k = int(centre_kji(ns)[0])
    region = np.zeros(ns.phantom.mask.shape, bool)
    region[:, :20, :] = True  # the upper half
    region_id = add_segment(ns, "region", region)
    previous = np.zeros_like(region)
    previous[k, 30:, 30:] = True  # ours, outside the editable area: kept
    slicer.util.updateSegmentBinaryLabelmapFromArray(
        previous.astype(np.uint8), ns.segmentation, ns.organ, ns.volume
    )
    ns.node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    ns.node.SetMaskSegmentID(region_id)
    ns.node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    click_centre(ns)
    ours = mask_of(ns, ns.organ)
    expected = (ns.phantom.mask & region & (np.arange(24) == k)[:, None, None]) | previous
    assert dice(ours, expected) >= 0.95 and not (ours & ~region & ~previous).any()

    ns.logic.Undo()
    ns.node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
    ns.node.SetSourceVolumeIntensityMask(True)
    ns.node.SetSourceVolumeIntensityMaskRange(-1000.0, 60.0)  # the background only
    click_centre(ns)  # the ball is not editable; the background of slice k is, and is cleared
    editable = ns.phantom.image <= 60.0
    np.testing.assert_array_equal(mask_of(ns, ns.organ), previous & ~editable)
    assert (previous & ~editable).any() and (previous & editable).any()


def test_propagate_fills_the_organ_and_is_one_undo_step(editor):
    ns = editor
    k = click_centre(ns)
    one_slice = mask_of(ns, ns.organ)
    ns.py.propagateButton.click()
    ns.qt.pump()
    kind, axis, index, seed = ns.py.logic.calls[-1]
    assert (kind, axis, index) == ("propagate", 0, k)
    np.testing.assert_array_equal(seed, one_slice[k])  # the segment's slice is the seed
    assert dice(mask_of(ns, ns.organ), ns.phantom.mask) >= 0.9
    assert "Propagated" in ns.py.statusLabel.text
    ns.logic.Undo()
    np.testing.assert_array_equal(mask_of(ns, ns.organ), one_slice)


def test_an_answer_goes_to_the_segment_it_was_asked_for(editor):
    ns = editor
    other = ns.segmentation.GetSegmentation().AddEmptySegment("other", "other")
    kji = centre_kji(ns)
    ns.py.addPoint(ras_of(kji), include=True)
    ns.node.SetSelectedSegmentID(other)  # the user picks another segment meanwhile
    ns.qt.pump()
    assert mask_of(ns, ns.organ).any() and not mask_of(ns, other).any()
    assert ns.effect.writes == [(ns.organ, [0, -1, 0, -1, 0, -1])] * 2  # no extent from Python


def test_cancel_drops_the_late_answer(editor):
    ns = editor
    ns.py.addPoint(ras_of(centre_kji(ns)), include=True)
    assert ns.py.cancelButton.enabled and not ns.py.propagateButton.enabled
    ns.py.cancelButton.click()
    ns.qt.pump()
    assert ns.py.logic.handles[-1].cancelled and not mask_of(ns, ns.organ).any()
    assert ns.py.propagateButton.enabled and not ns.logic.CanUndo()


def test_bad_prompts_and_geometry_are_explained_and_write_nothing(editor):
    ns = editor
    ns.py.addPoint(ras_of(centre_kji(ns)), include=False)
    assert "no include point and no box" in ns.py.statusLabel.text
    ns.py.addPoint(ras_of([-30, 5, 5]), include=True)
    assert "outside" in ns.py.statusLabel.text
    ns.py.onPropagate()
    assert "Prompt a slice first" in ns.py.statusLabel.text or "empty" in ns.py.statusLabel.text

    finer = MATRIX.copy()
    finer[2, 2] = 1.0  # 1 mm slices instead of 2
    grid = add_volume(ns.scene, np.zeros((48, 40, 40), np.int16), finer, "finer")
    ns.segmentation.SetReferenceImageGeometryParameterFromVolumeNode(grid)
    ns.py.addPoint(ras_of(centre_kji(ns)), include=True)
    assert "geometry is not the source volume's grid" in ns.py.statusLabel.text
    ns.qt.pump()
    assert not mask_of(ns, ns.organ).any() and not ns.logic.CanUndo()


@pytest.mark.slow
def test_through_the_server_a_box_and_propagate_fill_the_organ(slicer_scene, monkeypatch, tmp_path):
    """The whole path with the default model: the module's Logic starts the inference
    server (a QProcess of the stand-in, whose loop idles holding the GIL), a box on the
    middle slice, then Propagate, each written through the editor."""
    phantom = sphere((24, 64, 64), spacing=(0.9, 0.8, 2.0), radius=18.0)
    ns = make_editor(slicer_scene, monkeypatch, tmp_path, phantom)
    logic = module.RobustMedSAMLogic()
    logic.start_local_server("litemedsam", "cpu", python=sys.executable)
    ns.py.logic = logic
    try:
        k = int(centre_kji(ns)[0])
        rows, cols = np.nonzero(phantom.mask[k])
        low, high = [k, rows.min() - 2, cols.min() - 2], [k, rows.max() + 2, cols.max() + 2]
        ns.py.setBox(ras_of(low), ras_of(high))
        assert ns.qt.run(300, until=lambda: ns.py._handle is None), ns.py.statusLabel.text
        assert "segmented" in ns.py.statusLabel.text, ns.py.statusLabel.text
        written = mask_of(ns, ns.organ)
        assert dice(written[k], phantom.mask[k]) > 0.9 and written.sum() == written[k].sum()

        ns.py.onPropagate()
        assert ns.qt.run(300, until=lambda: ns.py._handle is None), ns.py.statusLabel.text
        assert "Propagated" in ns.py.statusLabel.text, ns.py.statusLabel.text
        assert dice(mask_of(ns, ns.organ), phantom.mask) > 0.8
        ns.logic.Undo()
        np.testing.assert_array_equal(mask_of(ns, ns.organ), written)
    finally:
        logic.stop_server()
        ns.qt.run(15, until=lambda: not logic.server.local or not logic.server.local.running)


def test_with_the_shared_logic_the_panel_chooses_the_server_first(editor, monkeypatch):
    """Used before the panel asked for a server, the effect has the panel choose one (the
    remote server of the settings or a local one) before each request."""
    ns = editor
    asked = []
    shared = LocalRequests(ns.qt)
    panel = types.SimpleNamespace(_ensureServer=lambda: asked.append(len(shared.calls)))
    monkeypatch.setattr(helper_module("logic"), "_shared_logic", shared)
    robustmedsam = types.SimpleNamespace(
        widgetRepresentation=lambda: types.SimpleNamespace(self=lambda: panel)
    )
    monkeypatch.setattr(slicer.modules, "robustmedsam", robustmedsam, raising=False)
    ns.py.logic = None
    k = click_centre(ns)
    assert asked == [0] and ns.py.logic is shared  # before the request went out
    assert dice(mask_of(ns, ns.organ)[k], ns.phantom.mask[k]) >= 0.95


@pytest.fixture
def box_only_server():
    """``server_harness.py --box-only``: a server whose model answers a point alone with
    nothing and draws in a box (``BoxBlobPredictor``, as LiteMedSAM behaves)."""
    from server_harness import start_harness

    process, url = start_harness("--box-only")
    yield url
    process.kill()
    process.wait(10)
    process.stdout.close()


@pytest.mark.slow  # a server process: about 2 minutes on this shared machine
def test_a_click_with_a_box_only_model_goes_through_the_point_search(
    slicer_scene, monkeypatch, tmp_path, box_only_server
):
    """The effect's click and Propagate through a real server (a subprocess) whose model
    takes boxes only: the click finds the ball by the point search, as ``segment`` does,
    and Propagate carries the box alone (the double overflows when fed its own logits,
    as LiteMedSAM does) and follows the ball to its ends."""
    from server_harness import TOKEN

    phantom = sphere((24, 64, 64), spacing=(0.9, 0.8, 2.0), radius=9.0, noise=5.0)
    ns = make_editor(slicer_scene, monkeypatch, tmp_path, phantom)
    logic = module.RobustMedSAMLogic()
    logic.use_remote_server(box_only_server, TOKEN)
    ns.py.logic = logic
    kji = centre_kji(ns) + [0, 2, 0]  # off the centre: a point is not a box's middle
    k = int(kji[0])
    ns.py.addPoint(ras_of(kji), include=True)
    assert ns.qt.run(60, until=lambda: ns.py._handle is None), ns.py.statusLabel.text
    assert "segmented" in ns.py.statusLabel.text, ns.py.statusLabel.text
    written = mask_of(ns, ns.organ)
    assert dice(written[k], phantom.mask[k]) > 0.9, dice(written[k], phantom.mask[k])

    ns.py.onPropagate()
    assert ns.qt.run(60, until=lambda: ns.py._handle is None), ns.py.statusLabel.text
    assert "Propagated" in ns.py.statusLabel.text, ns.py.statusLabel.text
    grown = mask_of(ns, ns.organ)
    truth_slices = np.flatnonzero(phantom.mask.any(axis=(1, 2)))
    assert np.flatnonzero(grown.any(axis=(1, 2))).tolist() == truth_slices.tolist()
    assert dice(grown, phantom.mask) > 0.9, dice(grown, phantom.mask)
