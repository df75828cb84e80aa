"""RobustMedSAM as a Segment Editor effect: prompt -> slice mask -> propagate.

The clinician stays in the Segment Editor: click include / exclude points or drag a box
in a slice view, and the model's mask for that slice replaces the selected segment on
that slice; *Propagate* grows the segment's slice into 3D. Every write goes through the
editor (``modifySegmentByLabelmap`` on the changed extent), so its masking (editable
area, intensity range on its source volume, overwrite mode) applies and each write is
one step of the editor's own undo.

The model runs in the module's inference server: the effect calls the module Logic's
``request_slice`` / ``request_propagate``, whose callbacks come back on the main
thread. It segments the editor's source volume, on the segmentation's grid, with the
volume's current display window (segment what the user sees).

Slicer loads this file by path (``qSlicerSegmentEditorScriptedEffect::setPythonSource``
uses the folder name as the module name): imports here are absolute.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import qt
import slicer
import vtk
from RobustMedSAMHelpers.mrml import (
    _numpy_matrix,
    _oriented_box,
    _own_layer,
    _read_box,
    _to_world,
)
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from RobustMedSAMLib.formats.volume import Volume

log = logging.getLogger(__name__)

EFFECT_NAME = "RobustMedSAM"  # no tr: modules find effects by name
PROMPT_KINDS = ("include", "exclude", "box")
POINT_COLORS = {"include": (0.1, 0.9, 0.1), "exclude": (0.95, 0.2, 0.2)}


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Include / exclude points and a box on a slice -> that slice of the selected
    segment; Propagate -> the segment in 3D. Prompts are world RAS; arrays are KJI on
    the segmentation's grid, which must be the source volume's grid."""

    def __init__(self, scriptedEffect) -> None:  # noqa: N803 (Slicer's name)
        scriptedEffect.name = EFFECT_NAME
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.logic = None  # the module's Logic; None: the shared one (see _logic)
        self._points: dict[str, object] = {}  # kind -> markups point list (display)
        self._box_node = None  # a flat ROI showing the box
        self._box: tuple[np.ndarray, np.ndarray] | None = None  # two RAS corners
        self._box_start: np.ndarray | None = None
        self._slice: tuple[int, int] | None = None  # (numpy axis, index) prompted last
        self._handle = None  # the request in flight
        self._request_id = 0

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects  # noqa: N813

        cloned = effects.qSlicerSegmentEditorScriptedEffect(None)
        cloned.setPythonSource(__file__.replace("\\", "/"))
        return cloned

    def icon(self):
        path = os.path.join(
            os.path.dirname(__file__), "..", "Resources", "Icons", "RobustMedSAM.png"
        )
        return qt.QIcon(path) if os.path.exists(path) else qt.QIcon()

    def helpText(self) -> str:  # noqa: N802
        return (
            "<html>Segment with RobustMedSAM (a Segment Anything model for medical images)."
            "<p>Choose <b>Include</b>, <b>Exclude</b> or <b>Box</b>, then click (for a box: "
            "drag) in a slice view: the selected segment is replaced on that slice by the "
            "model's mask. <b>Propagate</b> grows that slice into 3D. Masking and overwrite "
            "settings apply; Undo reverts each step.</p></html>"
        )

    # --- options frame --------------------------------------------------------------

    def setupOptionsFrame(self) -> None:  # noqa: N802
        self.kindButtons = {}
        row = qt.QHBoxLayout()
        for kind in PROMPT_KINDS:
            button = qt.QPushButton(kind.capitalize())
            button.checkable = True
            button.objectName = f"RobustMedSAM{kind.capitalize()}Button"
            button.connect("clicked()", lambda k=kind: self.setPromptKind(k))
            row.addWidget(button)
            self.kindButtons[kind] = button
        self.scriptedEffect.addLabeledOptionsWidget("Prompt:", row)
        self.propagateButton = qt.QPushButton("Propagate")
        self.propagateButton.toolTip = "Grow the segment's slice last prompted into 3D."
        self.propagateButton.connect("clicked()", self.onPropagate)
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.connect("clicked()", self.onCancel)
        self.clearButton = qt.QPushButton("Clear prompts")
        self.clearButton.connect("clicked()", self.clearPrompts)
        for button in (self.propagateButton, self.cancelButton, self.clearButton):
            self.scriptedEffect.addOptionsWidget(button)
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        self._updateButtons()

    def setMRMLDefaults(self) -> None:  # noqa: N802
        self.scriptedEffect.setParameterDefault("PromptKind", "include")

    def updateGUIFromMRML(self) -> None:  # noqa: N802
        kind = self.promptKind()
        for name, button in getattr(self, "kindButtons", {}).items():
            blocked = button.blockSignals(True)
            button.checked = name == kind
            button.blockSignals(blocked)

    def updateMRMLFromGUI(self) -> None:  # noqa: N802
        pass  # the kind buttons set the parameter themselves

    def promptKind(self) -> str:  # noqa: N802
        kind = self.scriptedEffect.parameter("PromptKind")
        return kind if kind in PROMPT_KINDS else "include"

    def setPromptKind(self, kind: str) -> None:  # noqa: N802
        self.scriptedEffect.setParameter("PromptKind", kind)
        self.updateGUIFromMRML()

    def deactivate(self) -> None:
        self.onCancel()

    def cleanup(self) -> None:
        self.onCancel()

    # --- prompts from the slice views -----------------------------------------------

    def processInteractionEvents(self, callerInteractor, eventId, viewWidget) -> bool:  # noqa: N802, N803
        """Left click (no modifier key) in a slice view places the chosen prompt; a box
        spans the press and the release. Returns True when the event was used."""
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
        if callerInteractor.GetShiftKey() or callerInteractor.GetControlKey():
            return False  # Slicer's own slice navigation keeps these
        if callerInteractor.GetAltKey():
            return False
        press = eventId == vtk.vtkCommand.LeftButtonPressEvent
        release = eventId == vtk.vtkCommand.LeftButtonReleaseEvent
        if not (press or release):
            return False
        ras = np.array(self.xyToRas(callerInteractor.GetEventPosition(), viewWidget), float)
        slice_node = viewWidget.mrmlSliceNode()
        kind = self.promptKind()
        if kind == "box":
            if press:
                self._box_start = ras
            elif self._box_start is not None:
                start, self._box_start = self._box_start, None
                self.setBox(start, ras, slice_node)
            return True
        if press:
            self.addPoint(ras, kind == "include", slice_node)
        return True

    def addPoint(self, ras, include: bool, slice_node=None) -> None:  # noqa: N802
        """Add an include (or exclude) point at world RAS ``ras`` and segment its slice,
        along the volume axis nearest the normal of ``slice_node`` (axial without one)."""
        kind = "include" if include else "exclude"
        node = self._pointList(kind)
        node.AddControlPointWorld(*map(float, ras))
        self.segmentSliceAt(np.asarray(ras, float), slice_node)

    def setBox(self, corner_a, corner_b, slice_node=None) -> None:  # noqa: N802
        """A box prompt between two world RAS corners on one slice; segment that slice."""
        a, b = np.asarray(corner_a, float), np.asarray(corner_b, float)
        self._box = (a, b)
        self._showBox(a, b)
        self.segmentSliceAt((a + b) / 2, slice_node)

    def clearPrompts(self) -> None:  # noqa: N802
        """Remove every point and the box (the segment is kept)."""
        for node in self._points.values():
            node.RemoveAllControlPoints()
        self._box = None
        if self._box_node is not None:
            self._box_node.RemoveAllControlPoints()
        self._status("Prompts cleared.")

    # --- model requests -------------------------------------------------------------

    def segmentSliceAt(self, ras, slice_node=None) -> None:  # noqa: N802
        """Ask the model for the slice holding ``ras``, from the prompts on that slice;
        the answer replaces the selected segment on that slice."""
        try:
            target = self._target()
            axis = self._axisOf(target["volume"], slice_node)
            index = self._sliceOf(target["volume"], axis, ras)
            points, labels = self._pointsOnSlice(target["volume"], axis, index)
            box = self._boxOnSlice(target["volume"], axis, index)
            if box is None and not (labels == 1).any():
                raise ValueError(f"slice {index} has no include point and no box: add one there")
        except ValueError as error:
            self._status(str(error))
            return
        self._slice = (axis, index)

        def done(mask, details=None) -> None:
            self._writeSlice(target, axis, index, mask)
            score = (details or {}).get("score")
            suffix = "" if score is None else f" (score {float(score):.2f})"
            self._status(f"Slice {index} segmented{suffix}.")

        self._request(
            f"Segmenting slice {index}",
            lambda on_done, on_error: self._logic().request_slice(
                target["volume_node"], axis, index, points, labels, box, on_done, on_error
            ),
            done,
        )

    def onPropagate(self) -> None:  # noqa: N802
        """Grow the selected segment's slice last prompted into 3D (replacing the segment
        elsewhere, within the editor's masking)."""
        if self._slice is None:
            self._status("Prompt a slice first: Propagate grows it into 3D.")
            return
        try:
            target = self._target()
        except ValueError as error:
            self._status(str(error))
            return
        axis, index = self._slice
        seed = self._segmentSlice(target, axis, index)
        if not seed.any():
            self._status(f"The segment is empty on slice {index}: nothing to propagate.")
            return

        def done(extent, mask, details=None) -> None:
            volume = np.zeros(target["volume"].shape, bool)
            volume[tuple(extent)] = np.asarray(mask, bool)  # nothing segmented outside
            self._write(target, volume, None)
            self._status(f"Propagated: {int(volume.sum())} voxels.")

        def progress(done_count: int, total: int) -> None:
            self._status(f"Propagating... {done_count}/{max(1, total)}")

        self._request(
            "Propagating",
            lambda on_done, on_error: self._logic().request_propagate(
                target["volume_node"], axis, index, seed, None, progress, on_done, on_error
            ),
            done,
        )

    def onCancel(self) -> None:  # noqa: N802
        handle, self._handle = self._handle, None
        self._request_id += 1  # a late answer of the cancelled request is dropped
        if handle is not None:
            handle.cancel()
            self._status("Cancelled.")
        self._updateButtons()

    def _request(self, what: str, start, done) -> None:
        """Start a request (one at a time: a new one replaces the one in flight);
        ``done(*answer)`` runs on the main thread with the Logic's answer unless the
        request was superseded or cancelled."""
        if self._handle is not None:
            self.onCancel()
        self._request_id += 1
        request = self._request_id

        def on_done(*answer) -> None:
            if request != self._request_id:
                return
            self._handle = None
            try:
                done(*answer)
            except Exception as error:  # shown once, never out of the Qt slot
                log.error("%s failed", what, exc_info=error)
                self._status(f"{what} failed: {error}")
            self._updateButtons()

        def on_error(error) -> None:
            if request != self._request_id:
                return
            self._handle = None
            self._status(f"{what} failed: {error}")
            self._updateButtons()

        self._status(f"{what}...")
        try:
            self._ensureServer()
            self._handle = start(on_done, on_error)
        except Exception as error:
            self._handle = None
            self._status(f"{what} failed: {error}")
        self._updateButtons()

    def _ensureServer(self) -> None:
        """The shared Logic's server as the panel chooses it (the remote server of the
        application settings, else a local one for the panel's model), started when the
        effect is used before the panel asked for one. Slicer creates the panel on
        ``widgetRepresentation()``."""
        import RobustMedSAM

        if self._logic() is not RobustMedSAM.shared_logic():
            return  # a Logic given to the effect brings its own server
        module = getattr(slicer.modules, "robustmedsam", None)
        if module is not None:
            module.widgetRepresentation().self()._ensureServer()

    def _logic(self):
        if self.logic is None:
            import RobustMedSAM

            self.logic = RobustMedSAM.shared_logic()
        return self.logic

    # --- writes through the editor ----------------------------------------------------

    def _target(self) -> dict:
        """The editor's segmentation, selected segment and source volume (as a library
        ``Volume``). ValueError, worded for the user, when one is missing or the
        segmentation's grid is not the source volume's."""
        editor = self.scriptedEffect.parameterSetNode()
        segmentation = editor.GetSegmentationNode() if editor else None
        segment_id = editor.GetSelectedSegmentID() if editor else None
        volume_node = editor.GetSourceVolumeNode() if editor else None
        if segmentation is None or not segment_id or volume_node is None:
            raise ValueError("choose a segmentation, a segment and a source volume first")
        volume = _grid_of(volume_node)
        grid = self.scriptedEffect.referenceGeometryImage()
        if grid is None or not _on_grid(grid, volume):
            raise ValueError(
                "the segmentation's geometry is not the source volume's grid: set it with "
                "'Specify geometry' to the source volume, without oversampling"
            )
        return {
            "segmentation": segmentation,
            "segment_id": segment_id,
            "volume_node": volume_node,
            "volume": volume,
        }

    def _writeSlice(self, target: dict, axis: int, index: int, mask) -> None:
        """Replace the segment on slice ``index`` by ``mask`` (``(rows, cols)`` bool)."""
        box = [slice(None)] * 3
        box[axis] = slice(index, index + 1)
        self._write(target, np.expand_dims(np.asarray(mask, bool), axis), tuple(box))

    def _write(self, target: dict, values: np.ndarray, box) -> None:
        """Make the segment ``values`` (KJI bool, ``box``'s shape) inside ``box`` (KJI
        slices of the grid; all of it for None) and keep it elsewhere, as one undo step,
        within the editor's masking.

        The whole grid: the editor's "Set". A box: "Remove" where ``values`` is 0, then
        "Add" where 1, each on the box's extent, so the cost follows the box: "Set"
        clears the segment everywhere first (``vtkSlicerSegmentEditorLogic.cxx:1922``).
        "Remove" lets the edited segment go outside a mask segment (as the Erase effect
        does, ``:1798-1815``), which "Set" keeps: the removal is limited to it here."""
        modes = slicer.qSlicerSegmentEditorAbstractEffect
        volume = target["volume"]
        self.scriptedEffect.saveStateForUndo()
        if box is None:
            whole = (slice(None),) * 3
            self._modify(target, _oriented_box(volume, whole, values), modes.ModificationModeSet)
            return
        # a segment sharing a layer is rewritten over the whole layer at each write
        # (vtkSegmentationModifier.cxx:104): give it a layer of its own once
        _own_layer(target["segmentation"], target["segment_id"])
        extent = list(_oriented_box(volume, box, values).GetExtent())
        remove = ~values
        editor = self.scriptedEffect.parameterSetNode()
        if editor.GetMaskMode() == slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment:
            inside = editor.GetMaskSegmentID() or ""
            remove &= _read_box(target["segmentation"], inside, volume, box)
        self._modify(
            target, _oriented_box(volume, box, remove), modes.ModificationModeRemove, extent
        )
        if values.any():
            self._modify(
                target, _oriented_box(volume, box, values), modes.ModificationModeAdd, extent
            )

    def _modify(self, target: dict, modifier, mode, extent: list[int] | None = None) -> None:
        """One editor write of ``modifier`` (a ``vtkOrientedImageData`` on the grid).
        Python reaches the extent only through ``modifySelectedSegmentByLabelmap``'s
        ``QList<int>`` overload (``modifySegmentByLabelmap`` takes a C array), so a
        segment no longer selected is written without one: the same result, since the
        modifier covers the extent only."""
        editor = self.scriptedEffect.parameterSetNode()
        selected = (
            editor.GetSegmentationNode() is target["segmentation"]
            and editor.GetSelectedSegmentID() == target["segment_id"]
        )
        if selected and extent is not None:
            self.scriptedEffect.modifySelectedSegmentByLabelmap(modifier, mode, extent)
        else:
            self.scriptedEffect.modifySegmentByLabelmap(
                target["segmentation"], target["segment_id"], modifier, mode
            )

    def _segmentSlice(self, target: dict, axis: int, index: int) -> np.ndarray:
        """The target segment on one slice, ``(rows, cols)`` bool."""
        box = [slice(None)] * 3
        box[axis] = slice(index, index + 1)
        plane = _read_box(
            target["segmentation"], target["segment_id"], target["volume"], tuple(box)
        )
        return np.squeeze(plane, axis=axis)

    # --- geometry ---------------------------------------------------------------------

    @staticmethod
    def _axisOf(volume, slice_node) -> int:
        """The numpy (KJI) axis of ``volume`` most nearly along the slice view's normal."""
        if slice_node is None:
            normal = np.array([0.0, 0.0, 1.0])
        else:
            matrix = slice_node.GetSliceToRAS()
            normal = np.array([matrix.GetElement(r, 2) for r in range(3)])
        directions = volume.ijk_to_ras[:3, :3] / np.linalg.norm(volume.ijk_to_ras[:3, :3], axis=0)
        ijk_axis = int(np.argmax(np.abs(normal @ directions)))
        return 2 - ijk_axis

    @staticmethod
    def _sliceOf(volume, axis: int, ras) -> int:
        from RobustMedSAMLib.errors import InputError
        from RobustMedSAMLib.inference.slicing import ras_to_slice_points

        try:
            indices, _ = ras_to_slice_points(volume, axis, np.asarray(ras, float)[None])
        except InputError as error:
            raise ValueError(str(error)) from None
        return int(indices[0])

    def _pointsOnSlice(self, volume, axis: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(Nx3 world RAS, N labels)`` of the points on slice ``index`` (1 = include)."""
        from RobustMedSAMLib.inference.slicing import ras_to_slice_points

        points, labels = [], []
        for kind, node in self._points.items():
            if not slicer.mrmlScene.IsNodePresent(node):
                continue  # removed, or from a closed scene
            for n in range(node.GetNumberOfControlPoints()):
                position = [0.0, 0.0, 0.0]
                node.GetNthControlPointPositionWorld(n, position)
                ras = np.array(position)
                try:
                    on, _ = ras_to_slice_points(volume, axis, ras[None])
                except Exception:
                    continue  # a point outside the volume prompts nothing
                if int(on[0]) == index:
                    points.append(ras)
                    labels.append(1 if kind == "include" else 0)
        return np.array(points, float).reshape(-1, 3), np.array(labels, int)

    def _boxOnSlice(self, volume, axis: int, index: int) -> np.ndarray | None:
        """The box's two RAS corners (2x3) when it was drawn on slice ``index``."""
        if self._box is None:
            return None
        centre = (self._box[0] + self._box[1]) / 2
        try:
            on = self._sliceOf(volume, axis, centre)
        except ValueError:
            return None
        return np.stack(self._box) if on == index else None

    # --- display ----------------------------------------------------------------------

    def _pointList(self, kind: str):
        node = self._points.get(kind)
        if node is None or slicer.mrmlScene.GetNodeByID(node.GetID()) is None:
            node = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLMarkupsFiducialNode", f"RobustMedSAM {kind}"
            )
            node.CreateDefaultDisplayNodes()
            display = node.GetDisplayNode()
            display.SetSelectedColor(*POINT_COLORS[kind])
            display.SetActiveColor(*POINT_COLORS[kind])
            node.SetLocked(True)  # a drag would not re-segment: placed points stay put
            self._points[kind] = node
        return node

    def _showBox(self, a: np.ndarray, b: np.ndarray) -> None:
        node = self._box_node
        if node is None or slicer.mrmlScene.GetNodeByID(node.GetID()) is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "RobustMedSAM box")
            node.CreateDefaultDisplayNodes()
            node.SetLocked(True)
            self._box_node = node
        node.SetCenterWorld(*map(float, (a + b) / 2))
        node.SetSize(*map(float, np.abs(b - a)))

    def _status(self, text: str) -> None:
        label = getattr(self, "statusLabel", None)
        if label is not None:
            label.text = text
        log.info(text)

    def _updateButtons(self) -> None:
        if hasattr(self, "cancelButton"):
            self.cancelButton.enabled = self._handle is not None
            self.propagateButton.enabled = self._handle is None


def _image_to_world(image) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _on_grid(image, volume) -> bool:
    """Whether a ``vtkOrientedImageData`` covers exactly the volume's voxel grid."""
    i0, i1, j0, j1, k0, k1 = image.GetExtent()
    whole = (i0, j0, k0) == (0, 0, 0) and (k1 + 1, j1 + 1, i1 + 1) == tuple(volume.shape)
    return whole and np.allclose(_image_to_world(image), volume.ijk_to_ras, atol=1e-4)


def _grid_of(volume_node) -> Volume:
    """The node's voxel grid as a ``Volume`` without its voxels (a zero-stride array):
    shape (KJI) and IJK->world RAS, linear parent transform applied."""
    from RobustMedSAMLib.errors import InputError

    image = volume_node.GetImageData()
    if image is None:
        raise ValueError(f"volume '{volume_node.GetName()}' holds no image data")
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    try:
        ijk_to_ras = _to_world(volume_node) @ _numpy_matrix(matrix)
    except InputError as error:
        raise ValueError(str(error)) from None
    shape = tuple(reversed(image.GetDimensions()))
    return Volume(np.broadcast_to(np.uint8(0), shape), ijk_to_ras, volume_node.GetName())
