"""The panel (``RobustMedSAMWidget``) run headless: its Python code paths execute against
real MRML (slicer-core) with the small Qt stand-in of ``slicer_headless``.

What is real: the module file, the Logic, MRML nodes and their events (placing a control
point fires the events the Widget observes), the parameter node's storage (a
``vtkMRMLScriptedModuleNode``), the server link's sockets and a real inference server
process (``server_harness.py``, remote mode), the library. What is a stand-in: Qt (timers
fire only when a test pumps them; widgets are recording objects built from the real .ui
file), ``slicer.app`` and its layout manager (over real slice nodes), message boxes, pip,
and the model (the harness serves ``ThresholdPredictor``). The parameter node's
GUI connectors are not run: a test sets a field and emits the widget's signal, as the
connector would.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
from server_harness import TOKEN, start_harness  # noqa: E402
from slicer_headless import (  # noqa: E402
    add_volume,
    helper_module,
    install_gui_stand_in,
    load_module_file,
    numpy_matrix,
    slicer_scene_fixture,
)

from RobustMedSAMLib import dependencies  # noqa: E402
from RobustMedSAMLib.datasets.phantoms import sphere  # noqa: E402
from RobustMedSAMLib.dependencies import Requirement  # noqa: E402
from RobustMedSAMLib.names import DEFAULT_MODEL  # noqa: E402
from RobustMedSAMLib.training import process as finetune_process  # noqa: E402

module = load_module_file()
REPO = Path(__file__).resolve().parents[2]
slicer_scene = pytest.fixture(slicer_scene_fixture)
THRESHOLD = 80.0  # HU between the phantom's background and its sphere
MATRIX = np.array(
    [[0.9, 0, 0, -12.0], [0, 0.8, 0, 7.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1]]
)  # IJK -> RAS: K is the axial axis


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


@pytest.fixture(scope="module")
def harness():
    """The threshold double served by ``server_harness.py`` (0.02 s per mask), as a
    remote server: ``(url, process)``; one for the module (it starts in seconds)."""
    process, url = start_harness("--delay", "0.02")
    yield url, process
    process.kill()
    process.wait(10)
    process.stdout.close()


@pytest.fixture
def panel(slicer_scene, monkeypatch, tmp_path, harness, request):
    """The Widget set up (not entered) on a scene with a sphere phantom volume, a
    crosshair in the Red (axial) view, all dependencies reported installed and the
    model work sent to the threshold double's server (remote mode, from the settings;
    indirect parameter True: settings already there at setup, as from a last session)."""
    gui = install_gui_stand_in(monkeypatch, str(tmp_path))
    settings_at_setup = getattr(request, "param", False)
    if settings_at_setup:
        gui.qt.settings.update({"RobustMedSAM/ServerURL": harness[0],
                                "RobustMedSAM/ServerToken": TOKEN})  # fmt: skip
    ok = [Requirement("torch", "torch>=2.0", "torch", "2.4.0", True)]
    monkeypatch.setattr(dependencies, "check", lambda requirements=None: list(ok))
    monkeypatch.setattr(dependencies, "pytorch_extension_available", lambda: False)
    starts = []

    def start_local_server(self, *args, **kwargs):  # records; a running stand-in
        starts.append(args)
        self.server.local = types.SimpleNamespace(stopping=False, stop=lambda: None)

    monkeypatch.setattr(module.RobustMedSAMLogic, "start_local_server", start_local_server)
    # a fresh Logic on this test's Qt
    monkeypatch.setattr(helper_module("logic"), "_shared_logic", None)
    layout = types.SimpleNamespace(widgets=[])
    layout.addWidget = layout.widgets.append
    parent = types.SimpleNamespace(isEntered=False, layout=lambda: layout)
    widget = module.RobustMedSAMWidget(parent)
    statuses: list[str] = []
    show_status = widget._status
    widget._status = lambda text: (statuses.append(text), show_status(text))[1]
    widget.setup()
    if not settings_at_setup:
        widget.setRemoteServer(harness[0], TOKEN)
    phantom = sphere((24, 40, 40), spacing=(0.9, 0.8, 2.0), radius=11.0)
    crosshair = slicer_scene.scene.AddNewNodeByClass("vtkMRMLCrosshairNode")
    red = gui.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
    crosshair.SetCursorPositionXYZ([10.0, 10.0, 0.0], red)
    ns = types.SimpleNamespace(
        gui=gui,
        ui=widget.ui,
        qt=gui.qt,
        widget=widget,
        parent=parent,
        layout=layout,
        scene=slicer_scene.scene,
        slicer_scene=slicer_scene,
        starts=starts,
        url=harness[0],
        statuses=statuses,
        phantom=phantom,
        requirements=ok,
    )
    try:
        yield ns
    finally:
        widget.cleanup()
        assert gui.app.cursor_depth == 0, "an override cursor was not restored"


def enter(ns) -> None:
    ns.parent.isEntered = True
    ns.widget.enter()
    ns.qt.pump()  # the dependency check is a singleShot(0)


def add_phantom(ns):
    return add_volume(ns.slicer_scene, ns.phantom.image, MATRIX, "phantom")


def choose_volume(ns, volume) -> None:
    """The user picks a volume in the selector (the connector then sets the parameter)."""
    ns.ui.inputVolumeSelector.setCurrentNode(volume)
    assert ns.widget._parameterNode.input_volume is volume


def idle(ns) -> bool:
    w = ns.widget
    return (
        w._operation is None
        and w._pending is None
        and not ns.qt.single_shots
        and not w._debounceTimer.isActive()
    )


def pump_until(ns, predicate, timeout: float = 20.0) -> None:
    """Fire the timers (as Qt's event loop would) until ``predicate()`` holds."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            label = ns.widget._operationLabel if ns.widget._operation else None
            raise TimeoutError(f"still waiting; request {label}, {ns.statuses[-3:]}")
        ns.qt.pump()
        time.sleep(0.005)


def centre_ras(ns, k: int | None = None) -> list[float]:
    centre = np.argwhere(ns.phantom.mask).mean(axis=0)
    if k is not None:
        centre[0] = k
    return list(map(float, (MATRIX @ np.r_[centre[::-1], 1.0])[:3]))


def place_include_point(ns, ras) -> None:
    """A point placed in the include list: MRML fires PointPositionDefinedEvent."""
    ns.widget._parameterNode.positive_points.AddControlPoint(*ras)


def segment(ns) -> np.ndarray:
    node = ns.widget._parameterNode
    volume = node.input_volume
    return ns.widget.logic.segment_mask(node.segmentation, node.segment_id, volume)


def test_setup_connects_every_control_and_enter_checks_dependencies(panel):
    ui, widget = panel.ui, panel.widget
    assert panel.layout.widgets == [panel.gui.ui] and ui.RobustMedSAM is panel.gui.ui
    for name in ("encodeButton", "propagateButton", "cancelButton", "undoButton", "previewButton"):
        assert getattr(ui, name).slots["clicked(bool)"], name
    assert ui.confidenceTable.headers == ["Slice", "Score", "Overlap", "Unsure"]
    assert ui.positivePlaceWidget.placeMultipleMarkups == 2
    node = widget._parameterNode
    assert node.positive_points.GetName() == "include" and node.model_name == DEFAULT_MODEL
    assert node.parameterNode.GetSingletonTag() == "RobustMedSAM"
    assert ui.encodeButton.enabled is False  # no volume yet
    enter(panel)
    assert ui.dependencyLabel.text == "All dependencies are installed."
    assert ui.installButton.enabled is False and not panel.gui.dialogs
    assert panel.gui.undo_action.shortcut.isEmpty() and widget._undoShortcut.enabled


def test_click_propagate_jump_undo_exit(panel):
    ui, widget, phantom = panel.ui, panel.widget, panel.phantom
    enter(panel)
    volume = add_phantom(panel)
    choose_volume(panel, volume)  # uploads the volume, asks the server to encode ahead
    assert widget._operation is not None and widget._operationLabel.startswith("Enc")
    assert ui.cancelButton.enabled and not ui.propagateButton.enabled

    k = int(np.argwhere(phantom.mask).mean(axis=0)[0])
    place_include_point(panel, centre_ras(panel, k))  # a click while the request runs
    assert widget._debounceTimer.isActive()
    pump_until(panel, lambda: idle(panel))
    node = widget._parameterNode
    assert node.segmentation is not None and node.segment_id
    mask = segment(panel)
    assert dice(mask[k], phantom.mask[k]) >= 0.95
    assert not np.delete(mask, k, axis=0).any(), "only the clicked slice is written"
    assert any(s.startswith("The server encodes") for s in panel.statuses), panel.statuses
    assert f"Slice {k} segmented (score 0.90)." in panel.statuses
    assert panel.statuses[-1].startswith("The server encodes ahead"), "resumed after the click"
    assert ui.undoButton.enabled and ui.propagateButton.enabled and not ui.cancelButton.enabled
    assert panel.starts == []  # remote mode: no local server

    ui.propagateButton.click()
    pump_until(panel, lambda: idle(panel))
    mask3d = segment(panel)
    assert dice(mask3d, phantom.mask) >= 0.8
    table = ui.confidenceTable
    rows = table.text_rows()
    assert len(rows) == len(widget._rows) >= 10
    assert [int(r[0]) for r in rows] == sorted(int(r[0]) for r in rows)
    assert re.fullmatch(r"\d+ slices, \d+ unsure", ui.confidenceSummaryLabel.text)
    assert max(ui.progressBar.values) > 0 and ui.progressBar.visible is False
    assert panel.statuses[-1].startswith("Propagated: ")

    row = len(rows) - 1
    table.emit("cellDoubleClicked(int,int)", row, 1)
    red = panel.gui.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
    origin = numpy_matrix(red.GetSliceToRAS())[:3, 3]
    k_in_view = (np.linalg.inv(MATRIX) @ np.r_[origin, 1.0])[2]
    assert round(k_in_view) == widget._rows[row].index == int(rows[row][0])

    shortcut = widget._undoShortcut
    shortcut.press()  # Ctrl+Z: back to the one-slice segment
    assert np.array_equal(segment(panel), mask)
    shortcut.press()  # the first write created the segment: it goes
    assert node.segmentation.GetSegmentation().GetNumberOfSegments() == 0
    assert not ui.undoButton.enabled
    assert panel.gui.undo_action.triggered == 0
    shortcut.press()  # nothing of ours to undo: Slicer's Edit > Undo gets it
    assert panel.gui.undo_action.triggered == 1

    widget.exit()
    assert panel.gui.undo_action.shortcut == panel.qt.QKeySequence("Ctrl+Z")
    assert not shortcut.enabled
    assert not node.gui_tags, "exit disconnects the GUI from the parameter node"


def test_next_unsure_selects_a_flagged_row_and_jumps(panel):
    ui, widget = panel.ui, panel.widget
    enter(panel)
    choose_volume(panel, add_phantom(panel))
    pump_until(panel, lambda: idle(panel))
    node = widget._parameterNode
    node.flag_score = 0.95  # every slice (score 0.9) is unsure
    place_include_point(panel, centre_ras(panel))
    pump_until(panel, lambda: idle(panel))
    ui.propagateButton.click()
    pump_until(panel, lambda: idle(panel))
    assert ui.nextUnsureButton.enabled
    ui.nextUnsureButton.click()
    first = ui.confidenceTable.currentRow()
    ui.nextUnsureButton.click()
    assert ui.confidenceTable.currentRow() == first + 1
    assert ui.confidenceTable.text_rows()[first][3] == "yes"


def test_cancel_during_slow_encoding_and_propagation_writes_nothing(panel):
    ui, widget = panel.ui, panel.widget
    enter(panel)
    choose_volume(panel, add_phantom(panel))
    assert widget._operation is not None and widget._operationLabel.startswith("Enc")
    ui.cancelButton.click()  # while the volume is uploaded: the upload goes on
    pump_until(panel, lambda: idle(panel))
    assert panel.statuses[-1].endswith(": cancelled.")

    node = widget._parameterNode
    node.auto_update = False
    place_include_point(panel, centre_ras(panel))
    assert not widget._debounceTimer.isActive()
    before = panel.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    ui.propagateButton.click()
    assert widget._operation is not None and widget._operationLabel == "Propagating"
    pump_until(panel, lambda: widget._operation.job_session is not None)  # runs on the server
    ui.cancelButton.click()
    pump_until(panel, lambda: idle(panel))
    assert panel.statuses[-1] == "Propagating: cancelled."
    assert node.segmentation is None
    assert panel.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == before
    assert not panel.gui.dialogs


def test_corruption_preview_adds_a_volume_and_reports_dice(panel):
    ui, widget = panel.ui, panel.widget
    enter(panel)
    volume = add_phantom(panel)
    choose_volume(panel, volume)
    pump_until(panel, lambda: idle(panel))
    node = widget._parameterNode
    node.auto_update = False
    node.corruption, node.severity = "gaussian_noise", 2
    place_include_point(panel, centre_ras(panel))
    red = panel.gui.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
    red.SetFieldOfView(31.0, 29.0, 2.0)
    red.JumpSliceByCentering(*centre_ras(panel, 15))  # the user looks at slice 15
    ui.previewButton.click()
    pump_until(panel, lambda: idle(panel))
    copy = panel.scene.GetFirstNodeByName("phantom gaussian_noise s2")
    assert copy is not None and copy.IsA("vtkMRMLScalarVolumeNode")
    assert not np.array_equal(
        slicer.util.arrayFromVolume(copy), slicer.util.arrayFromVolume(volume)
    )
    found = re.match(r"Dice clean vs corrupted: (\d\.\d{3}) ", ui.previewDiceLabel.text)
    assert found and 0.5 <= float(found.group(1)) <= 1.0, ui.previewDiceLabel.text
    assert panel.statuses[-1] == f"Preview ready: Dice {found.group(1)}."
    layout = panel.gui.app.layoutManager()
    assert layout.layouts == [slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView]
    yellow = layout.sliceWidget("Yellow")
    assert yellow.mrmlSliceCompositeNode().GetBackgroundVolumeID() == copy.GetID()
    assert yellow.mrmlSliceNode().GetOrientation() == "Axial"
    # the same slice and zoom on both sides (slicer-review.md, finding 12)
    np.testing.assert_allclose(
        numpy_matrix(yellow.mrmlSliceNode().GetSliceToRAS()),
        numpy_matrix(red.GetSliceToRAS()),
        atol=1e-9,
    )
    assert yellow.mrmlSliceNode().GetFieldOfView() == red.GetFieldOfView()
    assert not panel.gui.dialogs


class FakeFinetuneProcess:
    """Stands in for ``FinetuneProcess``: each ``poll`` gives the next batch of events;
    after the last one it has exited 0 with a model in its run folder."""

    made: list = []

    def __init__(self, config, out_dir, *, python="", resume=False, **kwargs) -> None:
        self.config, self.out_dir, self.resume = config, out_dir, resume
        self.batches = [
            [{"event": "start", "step": 0, "total_steps": 4}],
            [{"event": "step", "step": 2, "total_steps": 4, "loss": 0.5}],
            [{"event": "step", "step": 4, "total_steps": 4}, {"event": "done", "step": 4}],
        ]
        self.started, self.running, self.returncode, self.last_error = False, False, None, None
        FakeFinetuneProcess.made.append(self)

    def start(self) -> None:
        self.started = self.running = True

    def poll(self) -> list[dict]:
        events = self.batches.pop(0) if self.batches else []
        if not self.batches:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "last.safetensors").write_bytes(b"weights")
            self.running, self.returncode = False, 0
        return events

    def model_path(self, best: bool = False):
        return self.out_dir / "last.safetensors" if self.returncode == 0 else None

    def stop(self, timeout: float = 30.0) -> None:
        self.running = False


def test_finetuning_reports_progress_and_selects_the_new_model(panel, monkeypatch, tmp_path):
    ui, widget = panel.ui, panel.widget
    monkeypatch.setattr(finetune_process, "FinetuneProcess", FakeFinetuneProcess)
    FakeFinetuneProcess.made = []
    enter(panel)
    volume = add_phantom(panel)
    segmentation = panel.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "truth")
    widget.logic.write_mask(segmentation, volume, panel.phantom.mask, segment_name="sphere")
    out = tmp_path / "finetune"
    ui.finetuneOutputPathLineEdit.currentPath = str(out)
    ui.finetuneOutputPathLineEdit.emit("currentPathChanged(QString)", str(out))
    node = widget._parameterNode
    assert node.finetune_output == str(out)

    ui.finetuneStartButton.click()
    (process,) = FakeFinetuneProcess.made
    assert process.started and process.config.is_file()
    assert "data" in process.config.read_text() and list((out / "data").iterdir())
    assert ui.finetuneStopButton.enabled and not ui.finetuneStartButton.enabled
    pump_until(panel, lambda: not widget._finetuneTimer.isActive(), timeout=5)
    assert ui.finetuneProgressBar.values == [0, 0, 2, 4, 4]
    assert ui.finetuneProgressBar.maximum == 4
    model = process.out_dir / "last.safetensors"
    assert ui.finetuneStatusLabel.text == f"Finished: {model}"
    assert (node.model_name, node.checkpoint_path) == ("fused", str(model))
    assert ui.checkpointPathLineEdit.currentPath == str(model)
    assert ui.finetuneStartButton.enabled and not ui.finetuneStopButton.enabled
    assert not panel.gui.dialogs


def test_finetuning_without_an_output_folder_says_so_once(panel):
    """The error is shown once and stays in the slot (tryWithErrorDisplay re-raised it)."""
    enter(panel)
    panel.ui.finetuneStartButton.click()  # no exception out of the Qt slot
    assert len(panel.gui.dialogs) == 1 and "output folder" in panel.gui.dialogs[0][1]
    assert not panel.widget._finetuneTimer.isActive()
    assert panel.ui.finetuneStartButton.enabled


def test_a_point_outside_the_volume_goes_to_the_status_line_only(panel):
    enter(panel)
    choose_volume(panel, add_phantom(panel))
    pump_until(panel, lambda: idle(panel))
    place_include_point(panel, [5000.0, 5000.0, 5000.0])
    pump_until(panel, lambda: idle(panel))
    assert not panel.gui.dialogs
    assert panel.ui.statusLabel.text.startswith("Segmenting slice")


def test_an_error_while_writing_is_shown_once_and_queued_work_still_runs(panel, monkeypatch):
    enter(panel)
    choose_volume(panel, add_phantom(panel))
    pump_until(panel, lambda: idle(panel))
    ran = []

    def broken_write(*args, **kwargs):
        panel.widget._pending = lambda: ran.append("pending")  # e.g. a click queued meanwhile
        raise RuntimeError("disk full")

    monkeypatch.setattr(panel.widget.logic, "write_extent", broken_write)
    place_include_point(panel, centre_ras(panel))
    pump_until(panel, lambda: idle(panel) and ran)
    assert [kind for kind, _ in panel.gui.dialogs] == ["error"]
    assert "disk full" in panel.gui.dialogs[0][1] and ran == ["pending"]


def test_missing_torch_is_offered_on_first_use_not_on_entering(panel, monkeypatch):
    """Entering the module only says what is missing; the install is offered when the
    user first asks for model work, as the README says (slicer-review.md, finding 12)."""
    missing = [Requirement("torch", "torch>=2.0", "torch", None, False, "not installed")]
    monkeypatch.setattr(dependencies, "check", lambda requirements=None: list(missing))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "torch" else real_find_spec(name, *args),
    )
    panel.gui.confirm = False
    panel.widget.setRemoteServer("", "")  # a local server: torch is needed here
    enter(panel)
    assert panel.ui.dependencyLabel.text == "Missing: torch>=2.0 (not installed)"
    assert panel.ui.installButton.enabled and not panel.gui.dialogs

    choose_volume(panel, add_phantom(panel))  # no encoding without torch, no question
    assert not panel.gui.dialogs
    panel.ui.propagateButton.click()  # first use: asked; declined
    (kind, text), *_ = panel.gui.dialogs
    assert kind == "confirm" and "torch>=2.0" in text
    assert panel.statuses[-1] == "Dependencies not installed: segmentation is unavailable."
    panel.ui.propagateButton.click()  # asked again; declined again
    assert panel.widget._operation is None and not panel.starts
    assert [k for k, _ in panel.gui.dialogs] == ["confirm", "confirm"]
    assert not panel.gui.pip and not panel.qt.dialogs


def test_remote_mode_asks_only_for_the_clients_packages(panel, monkeypatch):
    """With a remote server (the fixture's settings) torch is not needed in Slicer."""
    asked = []

    def check(requirements=None):
        asked.append(list(requirements))
        return [Requirement("h11", "h11>=0.14", "h11", "0.16.0", True)]

    monkeypatch.setattr(dependencies, "check", check)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "torch" else real_find_spec(name, *args),
    )
    enter(panel)
    assert asked == [list(dependencies.CLIENT_REQUIREMENTS)] and not panel.gui.dialogs
    assert panel.ui.dependencyLabel.text == "All dependencies are installed."
    assert panel.widget._dependenciesReady()


def test_accepting_the_install_runs_pip_with_a_progress_dialog(panel, monkeypatch):
    missing = [
        Requirement("torch", "torch>=2.0", "torch", None, False, "not installed"),
        Requirement("tqdm", "tqdm>=4", "tqdm", None, False, "not installed"),
    ]
    monkeypatch.setattr(dependencies, "check", lambda requirements=None: list(missing))
    panel.ui.installButton.click()
    assert [arguments[:2] for arguments in panel.gui.pip] == [
        ["install", "torch>=2.0"],
        ["install", "tqdm>=4"],
    ]
    (dialog,) = panel.qt.dialogs
    assert dialog.closed and not panel.gui.dialogs[1:]


def missing_tqdm(monkeypatch):
    missing = [Requirement("tqdm", "tqdm>=4", "tqdm", None, False, "not installed")]
    monkeypatch.setattr(dependencies, "check", lambda requirements=None: list(missing))


def test_a_pip_failure_is_explained_from_pips_own_output(panel, monkeypatch):
    """Slicer 5.10's pip_install raised with no usable output (review finding 5)."""
    missing_tqdm(monkeypatch)
    panel.gui.pip_result = (1, "ERROR: [Errno 28] No space left on device\n")
    panel.ui.installButton.click()
    errors = [text for kind, text in panel.gui.dialogs if kind == "error"]
    assert len(errors) == 1 and "space" in errors[0].lower() and "Errno 28" in errors[0]


def test_slicer_512_packaging_shows_its_own_dialogs_and_the_panel_adds_none(panel, monkeypatch):
    missing_tqdm(monkeypatch)
    calls = []

    def pip_install(requirements, constraints=None, requester=None, **more):
        calls.append((requirements, requester))
        raise subprocess.CalledProcessError(1, "pip install")  # after Slicer's own dialog

    monkeypatch.setattr(
        slicer, "packaging", types.SimpleNamespace(pip_install=pip_install), raising=False
    )
    panel.ui.installButton.click()
    assert calls == [("tqdm>=4", "RobustMedSAM")] and not panel.gui.pip
    assert not panel.qt.dialogs  # no second progress dialog
    assert [kind for kind, _ in panel.gui.dialogs] == ["confirm"]  # no second error dialog
    assert "see Slicer's message" in panel.ui.statusLabel.text


def test_a_failed_pytorch_extension_install_is_shown_not_raised(panel, monkeypatch):
    missing = [Requirement("torch", "torch>=2.4", "torch", None, False, "not installed")]
    monkeypatch.setattr(dependencies, "check", lambda requirements=None: list(missing))
    monkeypatch.setattr(dependencies, "pytorch_extension_available", lambda: True)

    class Logic:
        def installTorch(self, **arguments):  # noqa: N802 (PyTorchUtils' name)
            raise subprocess.CalledProcessError(1, ["light_the_torch", "install"])

    fake = types.SimpleNamespace(PyTorchUtilsLogic=Logic)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", fake)
    panel.ui.installButton.click()  # nothing escapes the slot
    errors = [text for kind, text in panel.gui.dialogs if kind == "error"]
    assert len(errors) == 1 and "PyTorch was not installed" in errors[0]
    assert "light_the_torch" in errors[0]


def test_editor_masking_and_scene_close(panel):
    widget, phantom = panel.widget, panel.phantom
    enter(panel)
    choose_volume(panel, add_phantom(panel))
    pump_until(panel, lambda: idle(panel))
    # another module's private editor node (NNInteractive keeps one) is not the editor's
    private = panel.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    private.SetSourceVolumeIntensityMask(True)
    private.SetSourceVolumeIntensityMaskRange(1000.0, 2000.0)  # would block everything
    editor = slicer.vtkMRMLSegmentEditorNode()
    editor.SetSingletonTag("SegmentEditor")  # the Segment Editor module's own node
    panel.scene.AddNode(editor)
    editor.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
    editor.SetSourceVolumeIntensityMask(True)
    editor.SetSourceVolumeIntensityMaskRange(-1000.0, 100.0)  # the sphere's core is above
    k = int(np.argwhere(phantom.mask).mean(axis=0)[0])
    place_include_point(panel, centre_ras(panel, k))
    pump_until(panel, lambda: idle(panel))
    mask = segment(panel)
    assert mask[k].any() and not (mask[k] & (phantom.image[k] > 100)).any()

    panel.scene.Clear(0)  # File > Close scene
    pump_until(panel, lambda: idle(panel))
    node = widget._parameterNode
    assert node is not None and node.input_volume is None and node.segmentation is None
    assert node.positive_points is not None and node.positive_points.GetScene() is panel.scene
    panel.gui.app._layout = type(panel.gui.app._layout)(panel.scene)  # views come back
    volume = add_phantom(panel)
    choose_volume(panel, volume)
    pump_until(panel, lambda: idle(panel))
    place_include_point(panel, centre_ras(panel, k))  # the volume is uploaded again
    pump_until(panel, lambda: idle(panel))
    assert dice(segment(panel)[k], phantom.mask[k]) >= 0.95
    assert not panel.gui.dialogs and panel.starts == []


def test_local_server_follows_the_model_choice(panel):
    """Without a remote URL the panel starts a local server for the chosen model, keeps
    it while the choice stands and restarts it when the model changes."""
    widget, ui = panel.widget, panel.ui
    enter(panel)
    widget.setRemoteServer("", "")
    assert panel.qt.settings == {"RobustMedSAM/ServerURL": "", "RobustMedSAM/ServerToken": ""}
    widget._ensureServer()
    widget._ensureServer()  # running, same model: kept
    assert panel.starts == [(DEFAULT_MODEL, "auto", None)]
    widget._parameterNode.model_name = "medsam"
    ui.modelComboBox.emit("currentIndexChanged(int)", 2)
    widget._ensureServer()
    assert panel.starts[-1] == ("medsam", "auto", None) and len(panel.starts) == 2


@pytest.mark.parametrize("panel", [True], indirect=True)
def test_server_fields_choose_the_remote_server_and_empty_goes_back_to_local(panel):
    """The panel shows the settings' server from setup; typing a URL and token and
    finishing the edit stores them in the application settings and sends the next
    click to that server; an empty URL goes back to a local server (issue #21)."""
    widget, ui, phantom = panel.widget, panel.ui, panel.phantom
    assert ui.serverTokenLineEdit.echoMode == "QLineEdit::Password"
    assert ui.serverUrlLineEdit.placeholderText == "local server (empty)"
    assert (ui.serverUrlLineEdit.text, ui.serverTokenLineEdit.text) == (panel.url, TOKEN)
    widget.setRemoteServer("", "")
    assert (ui.serverUrlLineEdit.text, ui.serverTokenLineEdit.text) == ("", "")
    enter(panel)

    ui.serverUrlLineEdit.setText(panel.url)  # typed, not finished: nothing stored yet
    assert panel.qt.settings["RobustMedSAM/ServerURL"] == ""
    ui.serverUrlLineEdit.type_text(f" {panel.url} ")
    ui.serverTokenLineEdit.type_text(TOKEN)
    assert panel.qt.settings == {"RobustMedSAM/ServerURL": panel.url,
                                 "RobustMedSAM/ServerToken": TOKEN}  # fmt: skip
    choose_volume(panel, add_phantom(panel))
    k = int(np.argwhere(phantom.mask).mean(axis=0)[0])
    place_include_point(panel, centre_ras(panel, k))
    pump_until(panel, lambda: idle(panel))
    assert dice(segment(panel)[k], phantom.mask[k]) >= 0.95  # the threshold double's mask
    assert widget.logic.server.info == {"url": panel.url, "mode": "remote"}
    assert panel.starts == [] and not panel.gui.dialogs

    ui.serverUrlLineEdit.type_text("")
    assert panel.qt.settings["RobustMedSAM/ServerURL"] == ""
    widget._ensureServer()  # what the next request does first
    assert panel.starts == [(DEFAULT_MODEL, "auto", None)]


def test_points_of_a_newly_picked_include_list_segment(panel):
    """Picking another include list in its selector: its points are observed."""
    enter(panel)
    choose_volume(panel, add_phantom(panel))
    pump_until(panel, lambda: idle(panel))
    other = panel.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "other")
    panel.ui.positiveSelector.setCurrentNode(other)
    assert panel.widget._parameterNode.positive_points is other
    assert panel.ui.positivePlaceWidget.currentNode() is other
    other.AddControlPoint(*centre_ras(panel))
    assert panel.widget._debounceTimer.isActive()
    pump_until(panel, lambda: idle(panel))
    assert segment(panel).any() and not panel.gui.dialogs


def test_zoom_to_box_reaches_the_segment_options(panel):
    from RobustMedSAMLib.server.bodies import SegmentRequestOptions

    node = panel.widget._parameterNode
    assert panel.widget._segmentOptions(propagate=True)["zoom"] == "auto"  # small boxes zoom
    node.zoom_to_box = True  # what ticking "Zoom to the box" sets
    options = panel.widget._segmentOptions(propagate=True)
    assert options["zoom"] is True
    parsed = SegmentRequestOptions(**options)  # the server's schema takes every panel setting
    assert parsed.box_extension == node.box_extension and parsed.projection == node.projection


def test_the_stop_thresholds_reach_the_segment_options(panel):
    from RobustMedSAMLib.server.bodies import SegmentRequestOptions

    node = panel.widget._parameterNode
    options = SegmentRequestOptions(**panel.widget._segmentOptions(propagate=True))
    assert (options.min_likeness, options.min_stability) == (0.5, 0.2)  # the defaults
    node.min_likeness, node.min_stability = 0.0, 0.35  # the advanced options' spin boxes
    options = SegmentRequestOptions(**panel.widget._segmentOptions(propagate=True))
    assert (options.min_likeness, options.min_stability) == (0.0, 0.35)
    assert options.propagation().min_stability == 0.35


def test_the_box_growth_reaches_the_segment_options(panel):
    from RobustMedSAMLib.server.bodies import SegmentRequest

    node = panel.widget._parameterNode
    assert node.seed_box_growth == 0.05  # the library's default
    sent = SegmentRequest(options=panel.widget._segmentOptions(propagate=True)).options
    assert sent.seed_box_growth == 0.05
    node.seed_box_growth = 0.2  # the advanced options' "Grow the drawn box" spin box
    sent = SegmentRequest(options=panel.widget._segmentOptions(propagate=True)).options
    assert sent.seed_box_growth == 0.2


def test_the_slice_step_reaches_the_segment_options(panel):
    from RobustMedSAMLib.server.bodies import SegmentRequest

    node = panel.widget._parameterNode
    assert node.slice_step == 1  # the library's default: every slice
    sent = SegmentRequest(options=panel.widget._segmentOptions(propagate=True)).options
    assert sent.propagation().slice_step == 1
    node.slice_step = 3  # the advanced options' "Ask every Nth slice" spin box
    sent = SegmentRequest(options=panel.widget._segmentOptions(propagate=True)).options
    assert sent.propagation().slice_step == 3


def test_propagate_with_a_slice_step_fills_the_skipped_slices(panel):
    """Every other slice asked: the mask has no hole, and the confidence table lists the
    interpolated slices as "filled" (they have no score)."""
    ui, widget, phantom = panel.ui, panel.widget, panel.phantom
    enter(panel)
    choose_volume(panel, add_phantom(panel))
    pump_until(panel, lambda: idle(panel))
    widget._parameterNode.slice_step = 2
    place_include_point(panel, centre_ras(panel))
    pump_until(panel, lambda: idle(panel))
    ui.propagateButton.click()
    pump_until(panel, lambda: idle(panel))
    mask3d = segment(panel)
    assert dice(mask3d, phantom.mask) >= 0.8 and not panel.gui.dialogs
    written = np.flatnonzero(mask3d.any(axis=(1, 2)))
    assert np.array_equal(written, np.arange(written[0], written[-1] + 1))  # no hole
    rows = ui.confidenceTable.text_rows()
    filled = [r for r in rows if r[1] == "filled"]
    assert filled and all(r[3] == "" for r in filled)  # no score: never flagged unsure
    assert all(float(r[1]) > 0 for r in rows if r not in filled)
    assert {int(r[0]) for r in rows} == set(written.tolist())


def test_choosing_another_segmentation_never_picks_its_first_segment(panel):
    """qMRMLSegmentSelectorWidget selects the first segment of a new segmentation; a click
    must then create a new segment, not overwrite that one (review finding 8)."""
    enter(panel)
    volume = add_phantom(panel)
    choose_volume(panel, volume)
    pump_until(panel, lambda: idle(panel))
    place_include_point(panel, centre_ras(panel))
    pump_until(panel, lambda: idle(panel))
    node = panel.widget._parameterNode
    assert node.segment_id  # the module's own segment is selected
    other = panel.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "organs")
    other.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    liver = np.zeros(panel.phantom.mask.shape, bool)
    liver[2:5, 2:10, 2:10] = True
    liver_id = other.GetSegmentation().AddEmptySegment("liver", "liver")
    slicer.util.updateSegmentBinaryLabelmapFromArray(
        liver.astype(np.uint8), other, liver_id, volume
    )
    panel.ui.segmentationSelector.setCurrentNode(other)
    assert node.segmentation is other and node.segment_id == ""
    assert panel.ui.segmentSelector.currentSegmentID() == ""
    place_include_point(panel, centre_ras(panel))
    pump_until(panel, lambda: idle(panel))
    assert node.segment_id not in ("", liver_id)
    np.testing.assert_array_equal(panel.widget.logic.segment_mask(other, liver_id, volume), liver)


def test_syncing_a_loaded_parameter_node_keeps_its_segment_and_paths(panel, tmp_path):
    enter(panel)
    volume = add_phantom(panel)
    node = panel.widget._parameterNode
    segmentation = panel.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "saved")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for name in ("first", "second"):
        segmentation.GetSegmentation().AddEmptySegment(name, name)
    panel.widget.setParameterNode(None)
    node.segmentation, node.segment_id = segmentation, "second"  # as a loaded scene holds
    node.finetune_data_folder = str(tmp_path / "data")
    node.finetune_config = str(tmp_path / "base.toml")
    node.finetune_output = str(tmp_path / "runs")
    panel.widget.setParameterNode(node)
    assert node.segment_id == "second"
    assert panel.ui.segmentSelector.currentSegmentID() == "second"
    assert node.finetune_config == str(tmp_path / "base.toml")
    assert node.finetune_output == str(tmp_path / "runs")
    assert panel.ui.finetuneOutputPathLineEdit.currentPath == str(tmp_path / "runs")


def test_points_edited_while_the_module_is_hidden_write_nothing(panel):
    """exit() left the markups observed: edits elsewhere still wrote segments."""
    enter(panel)
    choose_volume(panel, add_phantom(panel))
    pump_until(panel, lambda: idle(panel))
    panel.widget.exit()
    panel.parent.isEntered = False
    place_include_point(panel, centre_ras(panel))
    assert not panel.widget._debounceTimer.isActive()
    assert panel.widget._parameterNode.segmentation is None  # nothing written
    enter(panel)
    place_include_point(panel, centre_ras(panel))
    assert panel.widget._debounceTimer.isActive()  # observed again once shown


def test_cleanup_releases_the_undo_shortcut(panel):
    shortcut = panel.widget._undoShortcut
    assert shortcut.parent is panel.gui.main_window
    panel.widget.cleanup()
    assert shortcut.parent is None


def test_removing_a_point_resegments_the_slice_it_was_on(panel):
    """The slice of the removed point is segmented again, not the last point's
    (slicer-review.md, finding 12: ``_lastPointRas`` took the last remaining point)."""
    enter(panel)
    choose_volume(panel, add_phantom(panel))
    pump_until(panel, lambda: idle(panel))
    k = int(np.argwhere(panel.phantom.mask).mean(axis=0)[0])
    inside = centre_ras(panel, k)
    for ras in (inside, [inside[0] + 2.0, inside[1], inside[2]], centre_ras(panel, k + 3)):
        place_include_point(panel, ras)
        pump_until(panel, lambda: idle(panel))
    assert any(s.startswith(f"Slice {k + 3} segmented") for s in panel.statuses[-4:])
    seen = len(panel.statuses)
    panel.widget._parameterNode.positive_points.RemoveNthControlPoint(0)  # one on slice k
    pump_until(panel, lambda: idle(panel))
    segmented = [s.split(" (")[0] for s in panel.statuses[seen:] if " segmented" in s]
    assert segmented == [f"Slice {k} segmented"], panel.statuses[seen:]


def test_another_modules_ctrl_z_shortcut_is_silenced_while_ours_holds_the_key(panel):
    """Two enabled QShortcuts on one key are ambiguous and neither fires; another
    module's (SlicerNNInteractive keeps a ``QShortcut("Ctrl+Z", mainWindow())`` until
    its cleanup) is off while this module is shown (slicer-review.md, finding 12)."""
    qt, main = panel.qt, panel.gui.main_window
    theirs = qt.QShortcut(qt.QKeySequence("Ctrl+Z"), main)
    other_keys = qt.QShortcut(qt.QKeySequence("Ctrl+Y"), main)
    enter(panel)
    ours = panel.widget._undoShortcut
    assert ours.isEnabled() and not theirs.isEnabled() and other_keys.isEnabled()
    panel.widget.exit()
    assert theirs.isEnabled() and not ours.isEnabled() and other_keys.isEnabled()
