"""The RobustMedSAM module's panel, ``RobustMedSAMWidget`` (built from
``Resources/UI/RobustMedSAM.ui``), and its pip helpers. Needs Slicer's GUI (Qt);
importing it does not: ``qt`` is None in slicer-core. ``RobustMedSAM.py`` re-exports it.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import subprocess
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:  # Slicer's PythonQt; absent in slicer-core (headless), where only the Logic is used
    import qt
except ImportError:
    qt = None

from RobustMedSAMHelpers.logic import (
    EditorMasking,
    RobustMedSAMLogic,
    RobustMedSAMParameterNode,
    shared_logic,
)
from RobustMedSAMHelpers.mrml import (
    DEFAULT_SEGMENT_NAME,
    _defined_points_world,
    _segment_editor_node,
    slice_box,
)
from RobustMedSAMHelpers.server_work import (
    axis_index,
    slice_centre_ras,
    slice_of_point,
    slice_scores,
    slices_of_points,
)
from RobustMedSAMLib.errors import CancelledError, InputError
from RobustMedSAMLib.inference.confidence import (
    ConfidenceRow,
    confidence_rows,
    next_unsure,
)

if TYPE_CHECKING:  # torch-heavy modules are imported when a session starts
    from RobustMedSAMLib.evaluation.robustness_preview import PreviewComparison

log = logging.getLogger("RobustMedSAM")  # the module file's logger, as before the split

UNDO_KEYS = "Ctrl+Z"
SETTINGS_URL = "RobustMedSAM/ServerURL"  # application settings (QSettings), not the scene
SETTINGS_TOKEN = "RobustMedSAM/ServerToken"
ORIENTATION_AXES = {"Axial": "axial", "Coronal": "coronal", "Sagittal": "sagittal"}


class RobustMedSAMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: turns GUI events into requests to the inference server (a local
    process, or a remote URL + token from the application settings) and writes the
    answers into MRML, all on the main thread; no Python thread does model work (see
    docs/slicer.md: PythonQt keeps the GIL while Qt idles).

    One request runs at a time (``self._operation``); a click while one runs waits for
    it (``self._pending``). The server encodes ahead on its own between requests.
    """

    DEBOUNCE_MS = 250

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: RobustMedSAMLogic | None = None
        self._parameterNode: RobustMedSAMParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._operation = None
        self._operationLabel = ""
        self._serverKey: tuple | None = None
        self._pending: Callable[[], None] | None = None
        self._dirty_view_axis: str | None = None
        self._rows: list[ConfidenceRow] = []
        self._rows_view: tuple | None = None  # (volume node, axis) of the table's rows
        self._observed_markups: list = []
        self._knownPoints: dict = {}  # markups node -> its defined points (Nx3 RAS) seen last
        self._dependencies_checked = False
        self._finetune = None

    # --- set-up ----------------------------------------------------------------------

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RobustMedSAM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = shared_logic()

        me = weakref.ref(self)  # the logic must not keep the panel alive (no cycle)
        self.logic.server.on_lost = lambda error: (w := me()) and w._serverLost(error)
        if hasattr(slicer.app, "connect"):  # app exit: the server process goes too
            slicer.app.connect("aboutToQuit()", self.logic.stop_server)
        self._debounceTimer = qt.QTimer()
        self._debounceTimer.setSingleShot(True)
        self._debounceTimer.setInterval(self.DEBOUNCE_MS)
        self._debounceTimer.connect("timeout()", self._onPromptsSettled)
        self._finetuneTimer = qt.QTimer()
        self._finetuneTimer.setInterval(500)
        self._finetuneTimer.connect("timeout()", self._pollFinetune)
        self._undoShortcut = qt.QShortcut(qt.QKeySequence(UNDO_KEYS), slicer.util.mainWindow())
        self._undoShortcut.connect("activated()", self.onUndoShortcut)
        self._undoShortcut.setEnabled(False)
        self._borrowedUndo: list = []  # Slicer's own actions on Ctrl+Z, while we hold it
        self._silencedShortcuts: list = []  # other QShortcuts on Ctrl+Z, off meanwhile

        self.ui.positivePlaceWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.negativePlaceWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.roiPlaceWidget.setMRMLScene(slicer.mrmlScene)
        for widget in (self.ui.positivePlaceWidget, self.ui.negativePlaceWidget):
            widget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.inputVolumeSelector.connect(
            "currentNodeChanged(vtkMRMLNode*)", self.onVolumeChanged
        )
        self.ui.segmentationSelector.connect(
            "currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged
        )
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentChanged)
        self.ui.positiveSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onMarkupsChanged)
        self.ui.negativeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onMarkupsChanged)
        self.ui.roiSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onMarkupsChanged)
        self.ui.checkpointPathLineEdit.connect("currentPathChanged(QString)", self.onCheckpointPath)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self._showRemoteServer()
        self.ui.serverUrlLineEdit.connect("editingFinished()", self.onServerEdited)
        self.ui.serverTokenLineEdit.connect("editingFinished()", self.onServerEdited)
        self.ui.encodeButton.connect("clicked(bool)", self.onEncode)
        self.ui.segmentSliceButton.connect("clicked(bool)", self.onSegmentSlice)
        self.ui.propagateButton.connect("clicked(bool)", self.onPropagate)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.confidenceTable.connect("cellDoubleClicked(int,int)", self.onConfidenceRow)
        self.ui.nextUnsureButton.connect("clicked(bool)", self.onNextUnsure)
        self.ui.previewButton.connect("clicked(bool)", self.onPreview)
        self.ui.finetuneDataPathLineEdit.connect(
            "currentPathChanged(QString)", self.onFinetunePaths
        )
        self.ui.finetuneConfigPathLineEdit.connect(
            "currentPathChanged(QString)", self.onFinetunePaths
        )
        self.ui.finetuneOutputPathLineEdit.connect(
            "currentPathChanged(QString)", self.onFinetunePaths
        )
        self.ui.finetuneStartButton.connect("clicked(bool)", self.onFinetuneStart)
        self.ui.finetuneStopButton.connect("clicked(bool)", self.onFinetuneStop)
        self.ui.installButton.connect("clicked(bool)", self.onInstallDependencies)

        self.ui.confidenceTable.setColumnCount(4)
        self.ui.confidenceTable.setHorizontalHeaderLabels(["Slice", "Score", "Overlap", "Unsure"])
        self.ui.confidenceTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.ui.confidenceTable.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self._setBusy(None)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Module closed: stop the work, observers and timers."""
        if self._operation is not None:
            self._operation.cancel()
        self.logic.stop_server()
        self.logic.server.on_lost = None
        if self._finetune is not None and self._finetune.running:
            self._finetune.stop(timeout=5.0)
        for timer in (self._debounceTimer, self._finetuneTimer):
            timer.stop()
        self._releaseUndoShortcut()
        self._undoShortcut.setParent(None)  # one QShortcut per Reload would stay behind
        self._observeMarkups([])
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.onMarkupsChanged()  # observe the prompt nodes again (exit stopped it)
        self._takeUndoShortcut()
        if not self._dependencies_checked:
            self._dependencies_checked = True
            # say what is missing; the install is offered on first use (_dependenciesReady)
            qt.QTimer.singleShot(0, lambda: self.checkDependencies(ask=False))

    def exit(self) -> None:
        """The module is hidden: points edited elsewhere no longer write segments."""
        self._releaseUndoShortcut()
        self._debounceTimer.stop()
        self._observeMarkups([])
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons
            )
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onMarkupsChanged
            )

    def onSceneStartClose(self, caller, event) -> None:
        if self._operation is not None:
            self._pending = None
            self._operation.cancel()
        self._forgetSessions()
        self.logic.stop_server()  # started again for the next request
        self._serverKey = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        node = self._parameterNode
        if not node.input_volume:
            node.input_volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not node.positive_points:
            node.positive_points = self._newPointList("include", (0.1, 0.9, 0.1))
        if not node.negative_points:
            node.negative_points = self._newPointList("exclude", (0.95, 0.2, 0.2))

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons
            )
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onMarkupsChanged
            )
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self.addObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onMarkupsChanged
            )
            self._syncUnboundWidgets()
            self.onMarkupsChanged()
        self._updateButtons()

    def _syncUnboundWidgets(self) -> None:
        """Widgets without a parameter-node connector: path edits and the segment. Their
        signals are blocked meanwhile: ctkPathLineEdit emits currentPathChanged on every
        set (whose slot would store the other, not yet synced, paths) and the segment
        selector picks a segment of its own (see :meth:`_showSegment`)."""
        node = self._parameterNode
        widgets = (
            (self.ui.checkpointPathLineEdit, node.checkpoint_path),
            (self.ui.finetuneDataPathLineEdit, node.finetune_data_folder),
            (self.ui.finetuneConfigPathLineEdit, node.finetune_config),
            (self.ui.finetuneOutputPathLineEdit, node.finetune_output),
        )
        for widget, path in widgets:
            blocked = widget.blockSignals(True)
            widget.currentPath = path
            widget.blockSignals(blocked)
        self._showSegment(node.segmentation, node.segment_id)

    def _newPointList(self, name: str, color: tuple[float, float, float]):
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        points.CreateDefaultDisplayNodes()
        points.GetDisplayNode().SetSelectedColor(*color)
        points.GetDisplayNode().SetActiveColor(*color)
        return points

    # --- parameter changes -----------------------------------------------------------

    def onVolumeChanged(self, node=None) -> None:
        # Qt calls this slot before the parameter node's connector (connected later) has
        # stored the new volume: store it first, or onEncode would use the old one.
        if self._parameterNode is not None and self._parameterNode.input_volume is not node:
            self._parameterNode.input_volume = node
        self._forgetSessions()
        self._updateButtons()
        ready = importlib.util.find_spec("torch") is not None
        if node is not None and self._parameterNode is not None and self.parent.isEntered and ready:
            self.onEncode()

    def onSegmentationChanged(self, node=None) -> None:
        """Another segmentation: keep the chosen segment only if it is in it; otherwise
        "None" (a new segment is created), never the first existing segment."""
        segment_id = self._parameterNode.segment_id if self._parameterNode else ""
        ids = node.GetSegmentation().GetSegmentIDs() if node is not None else ()
        segment_id = segment_id if segment_id in ids else ""
        self._showSegment(node, segment_id)
        if self._parameterNode is not None:
            self._parameterNode.segment_id = segment_id
        self._updateButtons()

    def _showSegment(self, segmentation, segment_id: str) -> None:
        """Show ``segment_id`` of ``segmentation`` ("" = None) in the segment selector.
        ``qMRMLSegmentSelectorWidget`` selects a new segmentation's first segment when its
        current ID is not in it (``populateSegmentCombobox``): signals are blocked while
        the node changes, then the wanted ID is set explicitly."""
        selector = self.ui.segmentSelector
        blocked = selector.blockSignals(True)
        selector.setCurrentNode(segmentation)
        selector.setCurrentSegmentID(segment_id or "")
        selector.blockSignals(blocked)

    def onSegmentChanged(self, segment_id: str) -> None:
        if self._parameterNode is not None:
            self._parameterNode.segment_id = segment_id or ""

    def onCheckpointPath(self, path: str) -> None:
        if self._parameterNode is not None:
            self._parameterNode.checkpoint_path = path
        self.onModelChanged()

    def onModelChanged(self, *_args) -> None:
        """A different model: the next request restarts the local server with it."""
        if self._serverKey is not None and self._serverKey[0] == "local":
            if self._serverKey[1:] != self._wantedModelKey():
                self._forgetSessions()

    def onFinetunePaths(self, *_args) -> None:
        if self._parameterNode is None:
            return
        self._parameterNode.finetune_data_folder = self.ui.finetuneDataPathLineEdit.currentPath
        self._parameterNode.finetune_config = self.ui.finetuneConfigPathLineEdit.currentPath
        self._parameterNode.finetune_output = self.ui.finetuneOutputPathLineEdit.currentPath

    def onMarkupsChanged(self, *_args) -> None:
        """Point the place widgets at the chosen nodes and observe their points. Also runs
        on every parameter node change: a selector's own signal comes before its
        connector has stored the new node."""
        node = self._parameterNode
        if node is None:
            return
        self.ui.positivePlaceWidget.setCurrentNode(node.positive_points)
        self.ui.negativePlaceWidget.setCurrentNode(node.negative_points)
        self.ui.roiPlaceWidget.setCurrentNode(node.roi)
        nodes = [n for n in (node.positive_points, node.negative_points, node.roi) if n]
        if nodes != self._observed_markups:
            self._observeMarkups(nodes)

    def _observeMarkups(self, nodes: list) -> None:
        events = (
            slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
            slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent,
            slicer.vtkMRMLMarkupsNode.PointRemovedEvent,
        )
        for old in self._observed_markups:
            for event in events:
                self.removeObserver(old, event, self._onPointEvent)
        for new in nodes:
            for event in events:
                self.addObserver(new, event, self._onPointEvent)
        self._observed_markups = list(nodes)
        self._knownPoints = {n: _defined_points_world(n) for n in nodes}
        for node, points in self._knownPoints.items():
            self._knownPoints[node] = np.zeros((0, 3)) if points is None else points

    def _updateButtons(self, *_args) -> None:
        node = self._parameterNode
        busy = self._operation is not None
        has_volume = bool(node and node.input_volume)
        has_segmentation = bool(node and node.segmentation)
        self.ui.encodeButton.enabled = has_volume and not busy
        self.ui.segmentSliceButton.enabled = has_volume and has_segmentation and not busy
        self.ui.propagateButton.enabled = has_volume and has_segmentation and not busy
        self.ui.previewButton.enabled = has_volume and not busy
        self.ui.cancelButton.enabled = busy
        can_undo = has_segmentation and self.logic.can_undo(node.segmentation)
        self.ui.undoButton.enabled = bool(can_undo) and not busy
        self.ui.nextUnsureButton.enabled = any(r.flagged for r in self._rows)
        running = self._finetune is not None and self._finetune.running
        self.ui.finetuneStartButton.enabled = not running
        self.ui.finetuneStopButton.enabled = running

    # --- the server and its requests -------------------------------------------------

    def _wantedModelKey(self) -> tuple:
        node = self._parameterNode
        return (node.model_name, node.checkpoint_path.strip(), node.device)

    def _remoteServer(self) -> tuple[str, str]:
        """``(url, token)`` of a remote server from the application settings (QSettings
        ``RobustMedSAM/ServerURL`` and ``RobustMedSAM/ServerToken``); ``("", "")``: local."""
        settings = qt.QSettings()
        url = str(settings.value(SETTINGS_URL, "") or "").strip()
        return url, str(settings.value(SETTINGS_TOKEN, "") or "").strip()

    def setRemoteServer(self, url: str, token: str) -> None:
        """Use the server at ``url`` with ``token`` from now on (kept in the application
        settings, not in the scene); an empty URL goes back to the local server."""
        settings = qt.QSettings()
        settings.setValue(SETTINGS_URL, url.strip())
        settings.setValue(SETTINGS_TOKEN, token.strip())
        self._serverKey = None
        self._forgetSessions()
        self._showRemoteServer()

    def _showRemoteServer(self) -> None:
        """Fill the URL and token fields from the settings (no editingFinished: set)."""
        if getattr(self, "ui", None) is None:
            return
        url, token = self._remoteServer()
        self.ui.serverUrlLineEdit.setText(url)
        self.ui.serverTokenLineEdit.setText(token)

    def onServerEdited(self) -> None:
        """The user finished editing the URL or token: use that server (an empty URL:
        the local one) when it differs from the settings' one."""
        wanted = (self.ui.serverUrlLineEdit.text.strip(), self.ui.serverTokenLineEdit.text.strip())
        if wanted != self._remoteServer():
            self.setRemoteServer(*wanted)

    def _ensureServer(self) -> None:
        """The remote server of the settings, else a local one for the chosen model,
        (re)started when the model, checkpoint or device changes or it stopped."""
        url, token = self._remoteServer()
        server = self.logic.server
        if url:
            if self._serverKey != ("remote", url, token) or not server.configured:
                self.logic.use_remote_server(url, token)
                self._serverKey = ("remote", url, token)
            return
        key = ("local", *self._wantedModelKey())
        if self._serverKey != key or server.local is None or server.local.stopping:
            _, name, checkpoint, device = key
            self.logic.start_local_server(name, device, checkpoint or None)
            self._serverKey = key
            self._status(f"Starting the local server ({name} on {device})...")

    def _forgetSessions(self) -> None:
        if self.logic is not None and getattr(self.logic, "_server", None) is not None:
            self.logic.server.forget_sessions()
        self._rows, self._rows_view = [], None

    def _serverLost(self, error: Exception) -> None:
        """The local server died while nothing was asked of it: say so once."""
        self._serverKey = None
        self._showError("The RobustMedSAM server", error)

    def _axisForEvent(self) -> str:
        """The axis to slice: the panel's choice, or (``view``) the orientation of the
        slice view under the mouse (where the point was just placed); else axial."""
        chosen = self._parameterNode.axis
        if chosen != "view":
            return chosen
        crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        if crosshair is not None:
            xyz = [0.0, 0.0, 0.0]
            slice_node = crosshair.GetCursorPositionXYZ(xyz)
            if slice_node is not None:
                axis = ORIENTATION_AXES.get(slice_node.GetOrientation())
                if axis:
                    self._dirty_view_axis = axis
                    return axis
        return self._dirty_view_axis or "axial"

    def _begin(self, label: str, request: Callable[..., Any], on_done: Callable[..., None]) -> bool:
        """Send a request: ``request(on_progress, on_done, on_error)`` returns its handle;
        ``on_done(*values)`` runs on the main thread when the answer comes. Returns False
        (and does nothing) while another request runs."""
        if self._operation is not None:
            return False
        node = self._parameterNode
        if node is None or node.input_volume is None:
            slicer.util.errorDisplay("Select an input volume first.")
            return False
        with self._showingErrors(label):
            self._ensureServer()
        if not self.logic.server.configured:
            return False
        self._setBusy(label)

        def progress(done: int, total: int) -> None:
            self.ui.progressBar.maximum = max(1, total)
            self.ui.progressBar.value = done

        def finished(*values) -> None:
            self._operation = None
            self._setBusy(None)
            try:
                with self._showingErrors(label):
                    on_done(*values)
            finally:
                self._startPending()  # a queued click or resumed encoding is never dropped

        def failed(error: Exception) -> None:
            self._operation = None
            self._setBusy(None)
            try:
                if isinstance(error, CancelledError):
                    self._status(f"{label}: cancelled.")
                else:
                    self._showError(label, error)
            finally:
                self._startPending()

        handle = request(progress, finished, failed)
        if handle.running:
            self._operation, self._operationLabel = handle, label
            self._updateButtons()
        return True

    def _startPending(self) -> None:
        if self._operation is None and self._pending is not None:
            pending, self._pending = self._pending, None
            pending()

    def _setBusy(self, label: str | None) -> None:
        self.ui.progressBar.visible = label is not None
        self.ui.progressBar.value = 0
        if label:
            self._status(f"{label}...")
        self._updateButtons()

    def _status(self, text: str) -> None:
        self.ui.statusLabel.text = text
        log.info(text)

    @contextmanager
    def _showingErrors(self, what: str) -> Iterator[None]:
        """Run the block; an error is shown once (:meth:`_showError`) and goes no further.
        ``slicer.util.tryWithErrorDisplay`` re-raises (``Base/Python/slicer/util.py``):
        nested uses show two dialogs and the exception escapes the Qt slot."""
        try:
            yield
        except Exception as error:
            self._showError(what, error)

    def _showError(self, what: str, error: Exception) -> None:
        if isinstance(error, InputError):
            self._status(f"{what}: {error}")
            if not what.startswith("Segmenting slice"):  # a click: the status line suffices
                slicer.util.warningDisplay(str(error), windowTitle=what)
        else:
            log.error("%s failed", what, exc_info=error)
            slicer.util.errorDisplay(f"{what} failed: {error}", detailedText=repr(error))

    def onCancel(self) -> None:
        if self._operation is not None:
            self._pending = None
            self._status(f"{self._operationLabel}: cancelling...")
            self._operation.cancel()  # may report "cancelled" at once

    # --- workflow: encode, click, propagate, undo ------------------------------------

    def onEncode(self) -> None:
        """Let the server encode the slices around the one in view while the user looks."""
        node = self._parameterNode
        axis = self._axisForEvent()
        with self._showingErrors("Encoding"):
            centre = self._sliceInView(axis)
            self._begin(
                f"Encoding {axis} slices",
                lambda progress, done, failed: self.logic.request_encode(
                    node.input_volume, axis, centre, done, failed, node.slice_step
                ),
                lambda queued: self._status(
                    f"The server encodes {queued} {axis} slices around {centre}: place points."
                ),
            )

    def _sliceInView(self, axis: str) -> int:
        """The slice along ``axis`` at the Red view's centre (the volume's middle otherwise)."""
        volume_node = self._parameterNode.input_volume
        try:
            slice_node = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
            matrix = slice_node.GetSliceToRAS()
            centre = [matrix.GetElement(r, 3) for r in range(3)]
            return slice_of_point(volume_node, axis, centre)
        except (AttributeError, InputError):
            shape = slicer.util.arrayFromVolume(volume_node).shape
            return shape[axis_index(axis)] // 2

    def _onPointEvent(self, caller, event) -> None:
        """A point was placed, moved or removed: segment its slice (a removed point's:
        the slice it was on) after a short pause."""
        changed = self._changedPoint(caller)
        if self._parameterNode is None or not self._parameterNode.auto_update:
            return
        self._lastPointNode = caller
        self._lastChangedPoint = changed
        self._lastAxis = self._axisForEvent()
        self._debounceTimer.start()

    def _onPromptsSettled(self) -> None:
        if self._operation is not None:
            self._pending = self._onPromptsSettled
            return
        self._segmentSliceOfLastPoint()

    def _changedPoint(self, node):
        """World RAS of the point an event is about: the one placed or moved (where it is
        now) or removed (where it was), found against the points seen before, since a
        markups event reaches Python without its point index."""
        if node.IsA("vtkMRMLMarkupsROINode"):
            return None
        now = _defined_points_world(node)
        now = np.zeros((0, 3)) if now is None else now
        before = self._knownPoints.get(node, np.zeros((0, 3)))
        self._knownPoints[node] = now
        fresh = [p for p in now if not np.isclose(before, p, atol=1e-6).all(axis=1).any()]
        if fresh:
            return fresh[-1]
        gone = [p for p in before if not np.isclose(now, p, atol=1e-6).all(axis=1).any()]
        return gone[0] if gone else None

    def _lastPointRas(self):
        changed = getattr(self, "_lastChangedPoint", None)
        if changed is not None:
            return changed
        node = getattr(self, "_lastPointNode", None)
        if node is None or node.GetNumberOfDefinedControlPoints() == 0:
            return None
        if node.IsA("vtkMRMLMarkupsROINode"):
            centre = [0.0, 0.0, 0.0]
            node.GetCenterWorld(centre)
            return centre
        for index in reversed(range(node.GetNumberOfControlPoints())):
            if node.GetNthControlPointPositionStatus(index) == node.PositionDefined:
                position = [0.0, 0.0, 0.0]
                node.GetNthControlPointPositionWorld(index, position)
                return position
        return None

    def _segmentSliceOfLastPoint(self) -> None:
        point = self._lastPointRas()
        if point is None or not self._dependenciesReady():
            return
        axis = getattr(self, "_lastAxis", None) or self._axisForEvent()
        self._segmentSliceAt(axis, point)

    def onSegmentSlice(self) -> None:
        """Segment the slice of the last placed point (or the slice in view)."""
        if not self._dependenciesReady():
            return
        self._segmentSliceAt(self._axisForEvent(), self._lastPointRas())

    def _segmentSliceAt(self, axis: str, point_ras) -> None:
        """Segment the slice holding ``point_ras`` (the one in view when None) from the
        points on it and the ROI, on the server; write it when the answer comes."""
        node = self._parameterNode
        with self._showingErrors("Segmenting slice: reading the prompts"):
            volume_node = node.input_volume
            index = (
                self._sliceInView(axis)
                if point_ras is None
                else slice_of_point(volume_node, axis, point_ras)
            )
            points, labels, roi = self.logic.server_prompts(
                node.positive_points, node.negative_points, node.roi
            )
            on_slice = slices_of_points(volume_node, axis, points) == index
            points, labels = points[on_slice], labels[on_slice]

            def write(mask: np.ndarray, details: dict) -> None:
                self._ensureSegmentation()
                shape = slicer.util.arrayFromVolume(volume_node).shape
                box = slice_box(shape, details["axis"], index)
                masking = self._masking(box)
                segment_id = self.logic.write_extent(
                    node.segmentation,
                    volume_node,
                    box,
                    np.expand_dims(mask, details["axis"]),
                    node.segment_id or None,
                    masking.overwrite_other_segments,
                    masking.editable_mask,
                    segment_name=DEFAULT_SEGMENT_NAME,
                )
                self._rememberSegment(segment_id)
                self._status(f"Slice {index} segmented (score {details['score']:.2f}).")
                self._resumeEncoding(axis, index)

            self._begin(
                f"Segmenting slice {index}",
                lambda progress, done, failed: self.logic.request_slice(
                    volume_node, axis, index, points, labels, roi, done, failed
                ),
                write,
            )

    def _resumeEncoding(self, axis: str, centre: int) -> None:
        """Ask the server to encode ahead around ``centre`` again (a job stopped it)."""
        if self._pending is not None:
            return
        volume_node = self._parameterNode.input_volume
        step = self._parameterNode.slice_step

        def encode() -> None:
            self._begin(
                "Encoding slices (resumed)",
                lambda progress, done, failed: self.logic.request_encode(
                    volume_node, axis, centre, done, failed, step
                ),
                lambda queued: self._status(f"The server encodes ahead around slice {centre}."),
            )

        self._pending = encode

    def onPropagate(self) -> None:
        """Segment the prompted slices and propagate into 3D, on the server."""
        if not self._dependenciesReady():
            return
        node = self._parameterNode
        axis = self._axisForEvent()
        with self._showingErrors("Propagating"):
            volume_node = node.input_volume
            prompts = self.logic.server_prompts(
                node.positive_points, node.negative_points, node.roi, as_arrays=False
            )
            options = self._segmentOptions(propagate=True)

            def write(mask: np.ndarray, record: dict) -> None:
                self._ensureSegmentation()
                masking = self._masking()
                segment_id = self.logic.write_mask(
                    node.segmentation,
                    volume_node,
                    mask,
                    node.segment_id or None,
                    masking.overwrite_other_segments,
                    masking.editable_mask,
                    segment_name=DEFAULT_SEGMENT_NAME,
                )
                self._rememberSegment(segment_id)
                scores = slice_scores(record)
                self._showConfidence((volume_node, axis), scores)
                seconds = record.get("timings", {}).get("total_seconds", 0.0)
                self._status(
                    f"Propagated: {int(mask.sum())} voxels on {len(scores)} slices in "
                    f"{seconds:.1f} s."
                )

            self._begin(
                "Propagating",
                lambda progress, done, failed: self.logic.request_segment(
                    volume_node, prompts, True, options, axis, progress, done, failed
                ),
                write,
            )

    def _segmentOptions(self, propagate: bool) -> dict:
        """The panel's propagation settings as the protocol's ``options``."""
        node = self._parameterNode
        return {
            "projection": node.projection,
            "box_extension": node.box_extension,
            "iou_threshold": node.stop_iou,
            "overlap": node.overlap_measure,
            "min_score": node.min_score,
            "min_area_ratio": node.min_area_ratio,
            "min_likeness": node.min_likeness,
            "min_stability": node.min_stability,
            "seed_box_growth": node.seed_box_growth,
            "stop_between_seeds": node.stop_between_seeds,
            "zoom": node.zoom_to_box or "auto",
            "slice_step": node.slice_step,
        }

    def _ensureSegmentation(self) -> None:
        node = self._parameterNode
        if node.segmentation is None:
            segmentation = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", f"{node.input_volume.GetName()} RobustMedSAM"
            )
            segmentation.CreateDefaultDisplayNodes()
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(node.input_volume)
            node.segmentation = segmentation

    def _masking(self, box: tuple[slice, slice, slice] | None = None) -> EditorMasking:
        """The Segment Editor's masking settings (on ``box`` of the grid, all of it when
        None) when asked for and the editor has a node in the scene; otherwise this
        panel's "overwrite other segments" choice (unchecked: overlap allowed)."""
        node = self._parameterNode
        editor = _segment_editor_node() if node.use_editor_masking else None
        if editor is None:
            return EditorMasking(None, node.overwrite_other_segments, box)
        return self.logic.editor_masking(
            editor, node.segmentation, node.input_volume, node.segment_id or None, box
        )

    def _rememberSegment(self, segment_id: str) -> None:
        self._parameterNode.segment_id = segment_id
        self._showSegment(self._parameterNode.segmentation, segment_id)
        self._updateButtons()

    def _takeUndoShortcut(self) -> None:
        """Hold Ctrl+Z while the module is shown. Two shortcuts on one key would both be
        ambiguous and neither would fire, so Slicer's own actions on it (Edit > Undo)
        give up the key until :meth:`_releaseUndoShortcut`; ours passes it on to them
        when this module has nothing to undo."""
        keys = qt.QKeySequence(UNDO_KEYS)
        main = slicer.util.mainWindow()
        for action in main.findChildren(qt.QAction):
            if action.shortcut.matches(keys) == qt.QKeySequence.ExactMatch:
                action.setShortcut(qt.QKeySequence())
                self._borrowedUndo.append(action)
        for shortcut in main.findChildren(qt.QShortcut):  # other modules' own, e.g.
            # SlicerNNInteractive's QShortcut("Ctrl+Z", mainWindow()), kept until cleanup
            if shortcut is self._undoShortcut or not shortcut.isEnabled():
                continue
            if shortcut.key.matches(keys) == qt.QKeySequence.ExactMatch:
                shortcut.setEnabled(False)
                self._silencedShortcuts.append(shortcut)
        self._undoShortcut.setEnabled(True)

    def _releaseUndoShortcut(self) -> None:
        self._undoShortcut.setEnabled(False)
        for action in self._borrowedUndo:
            action.setShortcut(qt.QKeySequence(UNDO_KEYS))
        self._borrowedUndo = []
        for shortcut in self._silencedShortcuts:
            shortcut.setEnabled(True)
        self._silencedShortcuts = []

    def onUndoShortcut(self) -> None:
        """Ctrl+Z: undo our last write, or Slicer's own undo when we have none."""
        node = self._parameterNode
        if node is not None and node.segmentation is not None and self._operation is None:
            if self.logic.can_undo(node.segmentation):
                self.onUndo()
                return
        for action in self._borrowedUndo:
            if action.enabled:
                action.trigger()
                return

    def onUndo(self) -> None:
        """Restore the segment(s) as they were before the last write (Ctrl+Z)."""
        node = self._parameterNode
        if node is None or node.segmentation is None or self._operation is not None:
            return
        if self.logic.undo_last(node.segmentation):
            self._status("Undone.")
        else:
            self._status("Nothing to undo.")
        self._updateButtons()

    # --- per-slice confidence --------------------------------------------------------

    def _showConfidence(self, view: tuple, scores) -> None:
        """The confidence table for ``scores`` (``slice_scores``) of ``view`` = (volume
        node, axis)."""
        node = self._parameterNode
        self._rows = confidence_rows(scores, node.flag_score, node.flag_overlap)
        self._rows_view = view
        table = self.ui.confidenceTable
        table.setRowCount(len(self._rows))
        for row, item in enumerate(self._rows):
            overlap = "" if math.isnan(item.overlap) else f"{item.overlap:.2f}"
            score = "filled" if item.source == "filled" else f"{item.score:.2f}"  # not asked
            cells = (str(item.index), score, overlap, "yes" if item.flagged else "")
            for column, text in enumerate(cells):
                cell = qt.QTableWidgetItem(text)
                if item.flagged:
                    cell.setBackground(qt.QBrush(qt.QColor(255, 220, 160)))
                table.setItem(row, column, cell)
        flagged = sum(r.flagged for r in self._rows)
        self.ui.confidenceSummaryLabel.text = f"{len(self._rows)} slices, {flagged} unsure"
        self._updateButtons()

    def onConfidenceRow(self, row: int, _column: int = 0) -> None:
        if 0 <= row < len(self._rows):
            self._jumpToSlice(self._rows[row].index)

    def onNextUnsure(self) -> None:
        current = self.ui.confidenceTable.currentRow()
        after = self._rows[current].index if 0 <= current < len(self._rows) else None
        index = next_unsure(self._rows, after)
        if index is None:
            return
        row = next(i for i, r in enumerate(self._rows) if r.index == index)
        self.ui.confidenceTable.selectRow(row)
        self._jumpToSlice(index)

    def _jumpToSlice(self, index: int) -> None:
        """Centre every slice view on the middle of slice ``index``."""
        if self._rows_view is None:
            return
        x, y, z = slice_centre_ras(*self._rows_view, index)
        for name in slicer.app.layoutManager().sliceViewNames():
            slice_node = slicer.app.layoutManager().sliceWidget(name).mrmlSliceNode()
            slice_node.JumpSliceByCentering(x, y, z)

    # --- corruption preview ----------------------------------------------------------

    def onPreview(self) -> None:
        """Corrupted copy -> both volumes segmented with the current prompts on the server
        -> side by side, each with its mask, and the Dice between them. The corruption
        itself is computed here, on the main thread (numpy; the GUI waits for it)."""
        if not self._dependenciesReady():
            return
        node = self._parameterNode
        axis = self._axisForEvent()
        with self._showingErrors("Preparing the preview"):
            volume_node = node.input_volume
            prompts = self.logic.server_prompts(
                node.positive_points, node.negative_points, node.roi, as_arrays=False
            )
            propagate = bool(self.ui.previewPropagateCheckBox.checked)
            options = self._segmentOptions(propagate)
            name, severity, seed = node.corruption, node.severity, node.corruption_seed
            self._status(f"Corrupting ({name}, severity {severity})...")
            copy = self.logic.corrupted_copy(volume_node, name, severity, seed)

            def segment(target, label: str, then) -> None:
                self._begin(
                    label,
                    lambda progress, done, failed: self.logic.request_segment(
                        target, prompts, propagate, options, axis, progress, done, failed
                    ),
                    then,
                )

            def clean_done(clean_mask: np.ndarray, _record: dict) -> None:
                def corrupted_done(corrupted_mask: np.ndarray, _other: dict) -> None:
                    from RobustMedSAMLib.evaluation.metrics import dice
                    from RobustMedSAMLib.evaluation.robustness_preview import PreviewComparison

                    score = dice(clean_mask, corrupted_mask)
                    comparison = PreviewComparison(clean_mask, corrupted_mask, float(score))
                    self._showPreview(volume_node, copy, comparison)

                self._pending = lambda: segment(copy, "Segmenting the corrupted copy",
                                                corrupted_done)  # fmt: skip

            segment(volume_node, "Segmenting the clean volume", clean_done)

    def _showPreview(self, clean_node, corrupted_node, comparison: PreviewComparison) -> None:
        """Side by side: Red shows the clean volume and its mask, Yellow the copy and its."""
        nodes = self.logic.write_preview(clean_node, corrupted_node, comparison)
        layout = slicer.app.layoutManager()
        layout.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
        views = []
        for view, volume_node, segmentation in zip(
            ("Red", "Yellow"), (clean_node, corrupted_node), nodes, strict=True
        ):
            widget = layout.sliceWidget(view)
            volume_id = volume_node.GetID()
            widget.mrmlSliceCompositeNode().SetBackgroundVolumeID(volume_id)
            slice_node = widget.mrmlSliceNode()
            display = segmentation.GetDisplayNode()
            display.RemoveAllViewNodeIDs()
            display.AddViewNodeID(slice_node.GetID())
            views.append(slice_node)
        red, yellow = views  # the same slice and zoom on both sides
        yellow.SetOrientation(red.GetOrientation())
        yellow.GetSliceToRAS().DeepCopy(red.GetSliceToRAS())
        yellow.SetFieldOfView(*red.GetFieldOfView())
        yellow.UpdateMatrices()
        self.ui.previewDiceLabel.text = (
            f"Dice clean vs corrupted: {comparison.dice:.3f} "
            f"(clean {int(comparison.clean_mask.sum())} voxels, corrupted "
            f"{int(comparison.corrupted_mask.sum())})"
        )
        self._status(f"Preview ready: Dice {comparison.dice:.3f}.")

    # --- fine-tuning -----------------------------------------------------------------

    def onFinetuneStart(self) -> None:
        if not self._dependenciesReady():
            return
        node = self._parameterNode
        with self._showingErrors("Starting fine-tuning"):
            if not node.finetune_output:
                raise InputError("choose an output folder for the fine-tuning run")
            out_dir = Path(node.finetune_output)
            out_dir.mkdir(parents=True, exist_ok=True)
            if node.finetune_source == "scene":
                data = out_dir / "data"
                pairs = self.logic.export_scene_training_data(data, overwrite=True)
                self._status(f"Exported {len(pairs)} image/label pairs to {data}.")
            else:
                if not node.finetune_data_folder:
                    raise InputError("choose the MedSegBench folder to train on")
                data = Path(node.finetune_data_folder)
            run = out_dir / time.strftime("run_%Y%m%d_%H%M%S")
            config = self.logic.write_finetune_config(
                run.with_suffix(".toml"), data, node.finetune_config or None
            )
            self._finetune = self.logic.start_finetune(config, run)
            self.ui.finetuneProgressBar.value = 0
            self.ui.finetuneStatusLabel.text = "Fine-tuning started."
            self._finetuneTimer.start()
        self._updateButtons()

    def _pollFinetune(self) -> None:
        from RobustMedSAMLib.training.process import describe, progress_of

        process = self._finetune
        if process is None:
            self._finetuneTimer.stop()
            return
        for event in process.poll():
            self.ui.finetuneStatusLabel.text = describe(event)
            done_total = progress_of(event)
            if done_total is not None:
                done, total = done_total
                self.ui.finetuneProgressBar.maximum = max(1, total)
                self.ui.finetuneProgressBar.value = done
        if process.running:
            return
        self._finetuneTimer.stop()
        model = process.model_path() if process.returncode == 0 else None
        if model is not None:
            self.ui.finetuneStatusLabel.text = f"Finished: {model}"
            self._parameterNode.model_name = "fused"
            self._parameterNode.checkpoint_path = str(model)
            self.ui.checkpointPathLineEdit.currentPath = str(model)
            self.onModelChanged()
            self._status("The fine-tuned model is selected (model 'fused', its checkpoint).")
        else:
            message = process.last_error or f"exit code {process.returncode}"
            self.ui.finetuneStatusLabel.text = f"Stopped: {message}"
        self._updateButtons()

    def onFinetuneStop(self) -> None:
        if self._finetune is not None and self._finetune.running:
            self.ui.finetuneStatusLabel.text = "Stopping (a checkpoint is kept)..."
            self._finetune.stop(timeout=30.0)
        self._updateButtons()

    # --- dependencies ----------------------------------------------------------------

    def _dependenciesReady(self) -> bool:
        """True when what this mode needs is installed (torch for a local server, the
        HTTP framing only for a remote one); otherwise offer the installation."""
        needed = "h11" if self._remoteServer()[0] else "torch"
        if importlib.util.find_spec(needed) is None:  # no import: torch takes seconds
            return self.checkDependencies(ask=True)
        return True

    def checkDependencies(self, ask: bool = True) -> bool:
        """Check the library's requirements; offer to install what is missing."""
        try:
            requirements, plan = self.logic.dependency_plan(remote=bool(self._remoteServer()[0]))
        except Exception as error:  # a broken environment must not break the panel
            log.warning("dependency check failed: %s", error)
            return True
        missing = [r for r in requirements if not r.ok]
        self.ui.dependencyLabel.text = (
            "All dependencies are installed."
            if not missing
            else "Missing: " + ", ".join(f"{r.spec} ({r.problem})" for r in missing)
        )
        self.ui.installButton.enabled = not plan.empty
        if plan.empty:
            return not missing
        if ask:
            return self._install(plan)
        return False

    def onInstallDependencies(self) -> None:
        self.checkDependencies(ask=True)

    def _install(self, plan) -> bool:
        """Install ``plan`` after confirmation, with a progress dialog; explain failures."""

        text = (
            "RobustMedSAM needs Python packages that are not installed in Slicer's Python:"
            f"\n\n{plan.summary()}\n\nDownload and install them now? (a few minutes; "
            "Slicer may look busy meanwhile)"
        )
        if not slicer.util.confirmOkCancelDisplay(text, windowTitle="Install dependencies"):
            self._status("Dependencies not installed: segmentation is unavailable.")
            return False
        constraints = None
        if plan.constraints:
            constraints = Path(slicer.app.temporaryPath) / "robustmedsam-constraints.txt"
            constraints.write_text("\n".join(plan.constraints) + "\n")
        # Slicer >= 5.12 shows its own progress dialog for each pip run: no second one
        steps = len(plan.pip) + (1 if plan.torch else 0)
        dialog = None if _slicer_packaging() else self._progressDialog(steps)
        try:
            if plan.torch and not self._installTorch(plan, constraints):
                return False
            for done, spec in enumerate(plan.pip, start=1 if plan.torch else 0):
                if dialog is not None:
                    dialog.setLabelText(f"Installing {spec} ({done + 1} of {steps})...")
                    dialog.setValue(done)
                slicer.app.processEvents()
                if not self._pipInstallExplained(spec, constraints):
                    return False
        finally:
            if dialog is not None:
                dialog.close()
        if plan.restart_needed:
            slicer.util.infoDisplay("Installed. Restart Slicer to use the new packages.")
        self.checkDependencies(ask=False)
        return True

    def _progressDialog(self, steps: int):
        dialog = qt.QProgressDialog("Installing...", "", 0, steps, slicer.util.mainWindow())
        dialog.setWindowTitle("RobustMedSAM: installing dependencies")
        dialog.setCancelButton(None)
        dialog.setMinimumDuration(0)
        dialog.setValue(0)
        return dialog

    def _pipInstallExplained(self, spec: str, constraints: Path | None) -> bool:
        """pip-install ``spec``; on failure say why, once. Slicer >= 5.12:
        ``slicer.packaging.pip_install``, which shows pip's log in its own error dialog
        (``Base/Python/slicer/packaging.py:759-764`` at v5.12.0) and raises without the
        output. Older: pip's output captured here (5.10's ``pip_install`` raises with
        ``output`` set to the spent file object) and explained
        (``dependencies.explain_failure``)."""
        from RobustMedSAMLib import dependencies

        packaging = _slicer_packaging()
        if packaging is not None:
            try:
                packaging.pip_install(
                    spec,
                    constraints=str(constraints) if constraints else None,
                    requester="RobustMedSAM",
                )
            except Exception as error:  # Slicer has shown pip's log
                self._status(f"Installing {spec} failed ({error}): see Slicer's message.")
                return False
            return True
        arguments = ["install", spec] + (["-c", str(constraints)] if constraints else [])
        code, output = run_pip(arguments)
        if code != 0:
            slicer.util.errorDisplay(
                dependencies.explain_failure(spec, output), windowTitle="Installation failed"
            )
            return False
        return True

    def _installTorch(self, plan, constraints: Path | None) -> bool:
        """PyTorch through the PyTorch extension (it picks the build for the GPU);
        through pip when the extension is not installed. Every failure is shown once:
        ``PyTorchUtilsLogic.installTorch`` raises ``CalledProcessError`` when
        light-the-torch fails (it returns None only when the user declines)."""
        try:
            import PyTorchUtils
        except ImportError:
            return all(self._pipInstallExplained(r.spec, constraints) for r in plan.torch)
        try:
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, **plan.torch_arguments()
            )
        except Exception as error:
            log.error("PyTorch installation failed", exc_info=error)
            torch = None
            reason = f"The PyTorch extension could not install it: {error}. "
        else:
            reason = ""
        if torch is None:
            slicer.util.errorDisplay(
                f"PyTorch was not installed. {reason}Install it from the PyTorch module "
                "(Utilities > PyTorch Utils), then open RobustMedSAM again.",
                windowTitle="Installation failed",
            )
            return False
        return True


def _slicer_packaging():
    """``slicer.packaging`` when this Slicer has its ``pip_install`` (5.12 and later)."""
    packaging = getattr(slicer, "packaging", None)
    if packaging is None:
        try:
            packaging = importlib.import_module("slicer.packaging")
        except ImportError:
            return None
    return packaging if hasattr(packaging, "pip_install") else None


def run_pip(arguments: list[str]) -> tuple[int, str]:
    """``PythonSlicer -m pip ARGUMENTS`` in Slicer's environment: ``(exit code, output)``,
    stdout and stderr together, the GUI kept alive meanwhile (line by line)."""
    command = [RobustMedSAMLogic.finetune_python(), "-m", "pip", *arguments]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        log.info(line.rstrip())
        slicer.app.processEvents()
    return process.wait(), "".join(lines)
