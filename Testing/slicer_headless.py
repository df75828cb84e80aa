"""A headless slicer-core scene with the module logics, for tests.

``slicer-core`` gives Slicer's MRML, logic and segmentation classes without Qt
or ``slicer.app``. :func:`make_scene` does the set-up they need (docs/slicer.md,
*Testing without the application*): a scene assigned to
``slicer.mrmlScene``, an application logic (it creates the selection node), and
the colors, volumes, segmentations and markups logics registered on it, which
in turn register the segmentation converter rules and the markups JSON storage
nodes. ``slicer.modules`` is replaced by a namespace holding those logics, so
``slicer.util`` helpers that call ``slicer.modules.<name>.logic()`` work.

Use it from a test as a fixture::

    slicer_scene = pytest.fixture(slicer_scene_fixture)

which skips the test cleanly when ``slicer`` cannot be imported.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

_LOGICS = {
    "Colors": "vtkSlicerColorLogic",
    "Volumes": "vtkSlicerVolumesLogic",
    "Segmentations": "vtkSlicerSegmentationsModuleLogic",
    "Markups": "vtkSlicerMarkupsLogic",
}


def make_scene() -> types.SimpleNamespace:
    """A fresh scene with logics; returns a namespace.

    Fields: ``slicer`` (the module), ``scene`` (vtkMRMLScene), ``app``
    (vtkSlicerApplicationLogic), and ``colors``, ``volumes``, ``segmentations``,
    ``markups`` (the module logics). Raises ImportError without slicer-core.
    """
    import slicer
    import vtk

    vtk.vtkObject.GlobalWarningDisplayOff()
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    logics = {}
    for name, class_name in _LOGICS.items():
        logic = getattr(slicer, class_name)()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        logics[name.lower()] = logic
    slicer.modules = types.SimpleNamespace(
        **{key: types.SimpleNamespace(logic=lambda lg=lg: lg) for key, lg in logics.items()}
    )
    return types.SimpleNamespace(slicer=slicer, scene=scene, app=app, **logics)


def close_scene(ns: types.SimpleNamespace) -> None:
    """Clear the scene and detach the logics (call at the end of a test)."""
    for key in _LOGICS:
        getattr(ns, key.lower()).SetMRMLScene(None)
    ns.app.SetMRMLScene(None)
    ns.scene.Clear(True)


def slicer_scene_fixture() -> Iterator[types.SimpleNamespace]:
    """Pytest fixture body: a fresh headless scene, skipped without slicer-core."""
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    ns = make_scene()
    try:
        yield ns
    finally:
        close_scene(ns)


def vtk_matrix(matrix: np.ndarray):
    """A vtkMatrix4x4 from a 4x4 numpy array."""
    import vtk

    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(matrix[r][c]))
    return out


def numpy_matrix(matrix) -> np.ndarray:
    """A 4x4 numpy array from a vtkMatrix4x4."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def add_volume(ns: types.SimpleNamespace, array: np.ndarray, ijk_to_ras: np.ndarray, name="vol"):
    """A vtkMRMLScalarVolumeNode holding ``array`` (KJI) with geometry ``ijk_to_ras``."""
    node = ns.slicer.util.addVolumeFromArray(array, name=name)
    node.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras))
    return node


def ijk_to_ras_of(volume_node) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a volume node as numpy."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return numpy_matrix(matrix)


MODULE_FILE = Path(__file__).resolve().parents[1] / "RobustMedSAM" / "RobustMedSAM.py"
# The module file is thin: the Logic, the Widget and the self-test live in its helper package.
HELPER_FILES = {
    name: MODULE_FILE.parent / "RobustMedSAMHelpers" / f"{name}.py"
    for name in ("logic", "widget", "selftest")
}


class Choice:
    """Stand-in for ``slicer.parameterNodeWrapper.Choice`` (keeps the choices)."""

    def __init__(self, choices) -> None:
        self.choices = tuple(choices)


class WithinRange:
    """Stand-in for ``slicer.parameterNodeWrapper.WithinRange``."""

    def __init__(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, maximum


class _Field:
    """One typed field of a wrapped parameter node, stored on the
    ``vtkMRMLScriptedModuleNode``: MRML nodes as node references, other values as JSON
    text (``SetParameter``), so setting one fires the node's ModifiedEvent as in Slicer.
    Reads give the declared default until set; read on the class, the default. Assignments
    are checked like Slicer's wrapper does: the type (TypeError), ``Choice`` and
    ``WithinRange`` (ValueError)."""

    def __init__(self, name: str, annotation, default) -> None:
        import typing

        self.name = name
        self.base = typing.get_args(annotation)[0] if typing.get_origin(annotation) else annotation
        self.extras = typing.get_args(annotation)[1:] if typing.get_origin(annotation) else ()
        self.is_node = isinstance(self.base, type) and self.base.__name__.startswith("vtkMRML")
        empty = {bool: False, int: 0, float: 0.0, str: ""}
        self.default = default if default is not _NO_DEFAULT else empty.get(self.base)

    def __get__(self, wrapper, owner=None):
        if wrapper is None:
            return self.default
        node = wrapper.parameterNode
        if self.is_node:
            return node.GetNodeReference(self.name)
        if self.name not in node.GetParameterNames():
            return self.default
        import json

        return self.base(json.loads(node.GetParameter(self.name)))

    def __set__(self, wrapper, value) -> None:
        import json

        self.check(value)
        node = wrapper.parameterNode
        if self.is_node:
            node.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
        else:
            node.SetParameter(self.name, json.dumps(self.base(value)))

    def check(self, value) -> None:
        base, name = self.base, self.name
        if self.is_node:
            if value is not None and not isinstance(value, base):
                raise TypeError(f"{name}: expected {base.__name__} or None, got {value!r}")
            return
        ok = (
            isinstance(value, bool)
            if base is bool
            else isinstance(value, (int, float) if base is float else base)
            and not isinstance(value, bool)
        )
        if not ok:
            raise TypeError(f"{name}: expected {base.__name__}, got {value!r}")
        for extra in self.extras:
            if isinstance(extra, Choice) and value not in extra.choices:
                raise ValueError(f"{name}: {value!r} is not one of {extra.choices}")
            if isinstance(extra, WithinRange) and not extra.minimum <= value <= extra.maximum:
                raise ValueError(f"{name}: {value!r} is outside {extra.minimum}..{extra.maximum}")


_NO_DEFAULT = object()


class _WrappedParameterNode:
    """Base of the classes :func:`parameter_node_wrapper` makes. ``connectGui`` binds only
    the node combo boxes (see there); tags not yet disconnected are in ``gui_tags``."""

    _fields = {}  # name -> _Field (no annotation: tests read the subclass hints)

    def __init__(self, parameterNode) -> None:  # noqa: N803 (Slicer's name)
        object.__setattr__(self, "parameterNode", parameterNode)
        object.__setattr__(self, "gui_tags", [])

    def __setattr__(self, name: str, value) -> None:
        if name not in self._fields:
            raise AttributeError(f"{type(self).__name__} has no parameter '{name}'")
        object.__setattr__(self, name, value)

    def connectGui(self, gui):  # noqa: N802 (Slicer's name)
        """Bind the node combo boxes whose ``SlicerParameterName`` names a field, both ways,
        as Slicer's connectors do: the widget's ``currentNodeChanged`` slot (connected
        after the panel's own slots, so it runs after them) sets the field; a change of
        the parameter node sets the widget. Other widget kinds are not bound."""
        import vtk

        combos = [
            (w, w.SlicerParameterName)
            for w in vars(gui).values()
            if isinstance(w, FakeNodeComboBox) and w.SlicerParameterName in self._fields
        ]

        def to_node(field):
            return lambda node: None if getattr(self, field) is node else setattr(self, field, node)

        slots = []
        for widget, field in combos:
            slot = to_node(field)
            widget.connect("currentNodeChanged(vtkMRMLNode*)", slot)
            slots.append((widget, slot))

        def to_widgets(*_args):
            for widget, field in combos:
                widget.setCurrentNode(getattr(self, field))

        observer = self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent, to_widgets)
        to_widgets()
        tag = (observer, slots)
        self.gui_tags.append(tag)
        return tag

    def disconnectGui(self, tag) -> None:  # noqa: N802 (Slicer's name)
        if tag in self.gui_tags:
            self.gui_tags.remove(tag)
            observer, slots = tag
            self.parameterNode.RemoveObserver(observer)
            for widget, slot in slots:
                widget.slots["currentNodeChanged(vtkMRMLNode*)"].remove(slot)

    def AddObserver(self, event, callback, priority=0.0):  # noqa: N802 (VTK's name)
        return self.parameterNode.AddObserver(event, callback, priority)

    def RemoveObserver(self, tag) -> None:  # noqa: N802 (VTK's name)
        self.parameterNode.RemoveObserver(tag)


def parameter_node_wrapper(cls):
    """Stand-in for ``slicer.parameterNodeWrapper.parameterNodeWrapper``: a class whose
    annotated fields live on the ``vtkMRMLScriptedModuleNode`` it wraps (see ``_Field``).
    The class keeps its annotations (tests read them) and its defaults as class values."""
    import sys
    import typing

    hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]), include_extras=True)
    fields = {
        name: _Field(name, hint, vars(cls).get(name, _NO_DEFAULT)) for name, hint in hints.items()
    }
    namespace = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "__annotations__": dict(cls.__annotations__),
        "_fields": fields,
        **fields,
    }
    return type(cls.__name__, (_WrappedParameterNode,), namespace)


def _missing(name: str) -> bool:
    """Whether module ``name`` is neither imported (a stub counts) nor importable."""
    import importlib.util
    import sys

    if name in sys.modules:
        return False
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def _stub_gui_modules() -> None:
    """Stand-ins for the Qt-dependent parts of Slicer's Python package that the module
    file imports: ``slicer.ScriptedLoadableModule`` (base classes) and
    ``slicer.parameterNodeWrapper`` (an identity decorator: the class keeps its
    annotations, which tests read). Real ones are left alone when present."""
    import sys
    import unittest

    import slicer

    if _missing("slicer.ScriptedLoadableModule"):
        stub = types.ModuleType("slicer.ScriptedLoadableModule")

        class ScriptedLoadableModule:
            def __init__(self, parent) -> None:
                self.parent = parent

        class ScriptedLoadableModuleLogic:
            def __init__(self, parent=None) -> None:
                self.parent = parent
                self.moduleName = type(self).__name__.removesuffix("Logic")

            def getParameterNode(self):  # noqa: N802 (Slicer's name)
                """Slicer's singleton ``vtkMRMLScriptedModuleNode`` tagged with the module name."""
                scene = slicer.mrmlScene
                node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
                if node is None:
                    node = slicer.vtkMRMLScriptedModuleNode()
                    node.SetSingletonTag(self.moduleName)
                    node.SetName(self.moduleName)
                    node = scene.AddNode(node)
                return node

        class ScriptedLoadableModuleWidget:
            def __init__(self, parent=None) -> None:
                self.parent = parent
                layout = getattr(parent, "layout", None)
                self.layout = layout() if callable(layout) else None

            def setup(self) -> None:  # Slicer adds its Reload & Test buttons here
                pass

            def resourcePath(self, filename: str) -> str:  # noqa: N802 (Slicer's name)
                return str(MODULE_FILE.parent / "Resources" / filename)

        class ScriptedLoadableModuleTest(unittest.TestCase):
            def delayDisplay(self, message, msec=None) -> None:  # noqa: N802 (Slicer's name)
                pass

        for cls in (
            ScriptedLoadableModule,
            ScriptedLoadableModuleLogic,
            ScriptedLoadableModuleWidget,
            ScriptedLoadableModuleTest,
        ):
            setattr(stub, cls.__name__, cls)
        sys.modules["slicer.ScriptedLoadableModule"] = stub
        slicer.ScriptedLoadableModule = stub
    if _missing("slicer.parameterNodeWrapper"):
        wrapper = types.ModuleType("slicer.parameterNodeWrapper")
        wrapper.parameterNodeWrapper = parameter_node_wrapper
        wrapper.Choice = Choice
        wrapper.WithinRange = WithinRange
        sys.modules["slicer.parameterNodeWrapper"] = wrapper
        slicer.parameterNodeWrapper = wrapper


def load_module_file() -> types.ModuleType:
    """Import ``RobustMedSAM/RobustMedSAM.py`` as Slicer does (module name
    ``RobustMedSAM``), with the GUI-only Slicer parts stubbed. Raises ImportError
    without slicer-core."""
    import importlib.util
    import sys

    _stub_gui_modules()
    if "RobustMedSAM" in sys.modules and getattr(sys.modules["RobustMedSAM"], "__file__", None):
        return sys.modules["RobustMedSAM"]
    spec = importlib.util.spec_from_file_location("RobustMedSAM", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["RobustMedSAM"] = module
    spec.loader.exec_module(module)
    return module


def helper_module(name: str) -> types.ModuleType:
    """``RobustMedSAMHelpers.<name>`` (``logic``, ``widget``, ...), where the module file's
    classes and names live: patch names there, not on the module file."""
    import importlib

    load_module_file()  # puts the helper package on sys.path
    return importlib.import_module(f"RobustMedSAMHelpers.{name}")


# --- GUI stand-in: a small, explicit fake of qt, the .ui tree and slicer.app ------------
#
# Enough of Qt for the Widget's Python code to run against real MRML. Widgets hold only
# the properties and signals listed for their class: a wrong name raises AttributeError
# (reading or writing) or ValueError (connecting an unknown signal; real Qt only warns,
# leaving a dead control). Timers never fire on their own: tests pump them.


def call_slot(slot, args: tuple):
    """Call ``slot`` with as many of ``args`` as it takes (PythonQt does the same)."""
    import inspect

    try:
        parameters = list(inspect.signature(slot).parameters.values())
    except (TypeError, ValueError):
        return slot(*args)
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return slot(*args)
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return slot(*args[: len(positional)])


class FakeWidget:
    """A widget of the .ui file: ``PROPERTIES`` (start values from the .ui), ``SIGNALS``
    (``connect`` records slots, ``emit`` calls them) and the methods of its class."""

    PROPERTIES = frozenset({"enabled", "visible", "toolTip", "objectName", "SlicerParameterName"})
    SIGNALS: frozenset[str] = frozenset()

    def __init__(self, name: str, properties: dict) -> None:
        values = {"enabled": True, "visible": True, "toolTip": "", "objectName": name}
        values.update({k: v for k, v in properties.items() if k in self.PROPERTIES})
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "slots", {})
        object.__setattr__(self, "scene", None)
        object.__setattr__(self, "_blocked", False)

    def __getattr__(self, name: str):
        values = object.__getattribute__(self, "_values")
        if name in type(self).PROPERTIES:
            return values.get(name)
        raise AttributeError(f"{type(self).__name__} '{values['objectName']}' has no '{name}'")

    def __setattr__(self, name: str, value) -> None:
        if name not in type(self).PROPERTIES:
            raise AttributeError(f"{type(self).__name__} '{self.objectName}' has no '{name}'")
        self._values[name] = value

    def connect(self, signal: str, slot) -> bool:
        if signal not in self.SIGNALS:
            raise ValueError(f"{type(self).__name__} '{self.objectName}' has no signal {signal}")
        self.slots.setdefault(signal, []).append(slot)
        return True

    def emit(self, signal: str, *args) -> None:
        if signal not in self.SIGNALS:
            raise ValueError(f"{type(self).__name__} has no signal {signal}")
        if self._blocked:
            return
        for slot in list(self.slots.get(signal, [])):
            call_slot(slot, args)

    def blockSignals(self, block: bool) -> bool:  # noqa: N802
        """QObject::blockSignals: returns the previous state."""
        previous = self._blocked
        object.__setattr__(self, "_blocked", bool(block))
        return previous

    def setEnabled(self, on: bool) -> None:  # noqa: N802 (Qt's names)
        self.enabled = bool(on)

    def setToolTip(self, text: str) -> None:  # noqa: N802
        self.toolTip = text


class FakeMRMLWidget(FakeWidget):
    SIGNALS = frozenset({"mrmlSceneChanged(vtkMRMLScene*)"})

    def setMRMLScene(self, scene) -> None:  # noqa: N802
        object.__setattr__(self, "scene", scene)


class FakeLabel(FakeWidget):
    PROPERTIES = FakeWidget.PROPERTIES | {"text", "wordWrap"}


class FakeButton(FakeWidget):
    PROPERTIES = FakeWidget.PROPERTIES | {"text", "checked", "checkable"}
    SIGNALS = frozenset({"clicked(bool)", "clicked()", "toggled(bool)"})

    def click(self) -> None:
        """QAbstractButton::click: a checkable button toggles, then both clicked signals."""
        if self.checkable:
            self.checked = not self.checked
        self.emit("clicked(bool)", bool(self.checked))
        self.emit("clicked()")


class FakeCheckBox(FakeButton):
    SIGNALS = FakeButton.SIGNALS | {"stateChanged(int)"}


class FakeComboBox(FakeWidget):
    PROPERTIES = FakeWidget.PROPERTIES | {"currentText", "currentIndex"}
    SIGNALS = frozenset({"currentIndexChanged(int)", "currentTextChanged(QString)"})


class FakeSpinBox(FakeWidget):
    PROPERTIES = FakeWidget.PROPERTIES | {"value", "minimum", "maximum", "singleStep", "decimals"}
    SIGNALS = frozenset({"valueChanged(int)", "valueChanged(double)"})


class FakeProgressBar(FakeWidget):
    PROPERTIES = FakeWidget.PROPERTIES | {"value", "minimum", "maximum", "textVisible"}

    def __init__(self, name: str, properties: dict) -> None:
        super().__init__(name, {"value": 0, "minimum": 0, "maximum": 100, **properties})
        object.__setattr__(self, "values", [])  # every value set, in order

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name == "value":
            self.values.append(value)


class FakeCollapsibleButton(FakeWidget):
    PROPERTIES = FakeWidget.PROPERTIES | {"text", "collapsed"}
    SIGNALS = frozenset({"contentsCollapsed(bool)"})


class FakePathLineEdit(FakeWidget):
    """Setting ``currentPath`` emits ``currentPathChanged`` when the text changes, as
    ``ctkPathLineEdit::setCurrentPath`` does (``QLineEdit::setText`` -> ``textChanged``
    -> ``updateHasValidInput`` -> ``currentPathChanged``; CTK ``ctkPathLineEdit.cpp``)."""

    PROPERTIES = FakeWidget.PROPERTIES | {"currentPath", "filters", "settingKey"}
    SIGNALS = frozenset({"currentPathChanged(QString)"})

    def __init__(self, name: str, properties: dict) -> None:
        super().__init__(name, {"currentPath": "", **properties})

    def __setattr__(self, name: str, value) -> None:
        changed = name == "currentPath" and value != self._values.get("currentPath")
        super().__setattr__(name, value)
        if changed:
            self.emit("currentPathChanged(QString)", value)


class FakeLineEdit(FakeWidget):
    """``QLineEdit``: ``setText`` (from code) emits only ``textChanged``; ``editingFinished``
    comes from the user (Return or focus out), as in Qt; ``type_text`` is the user."""

    PROPERTIES = FakeWidget.PROPERTIES | {"text", "placeholderText", "echoMode"}
    SIGNALS = frozenset({"editingFinished()", "textChanged(QString)"})

    def __init__(self, name: str, properties: dict) -> None:
        super().__init__(name, {"text": "", "placeholderText": "", **properties})
        if self.echoMode is None:
            self.echoMode = "QLineEdit::Normal"

    def setText(self, text: str) -> None:  # noqa: N802
        changed = text != self.text
        self.text = text
        if changed:
            self.emit("textChanged(QString)", text)

    def type_text(self, text: str) -> None:
        """The user replaces the text and presses Return."""
        self.setText(text)
        self.emit("editingFinished()")


class FakeNodeComboBox(FakeMRMLWidget):
    PROPERTIES = FakeWidget.PROPERTIES | {
        "nodeTypes", "showChildNodeTypes", "noneEnabled", "addEnabled", "removeEnabled",
        "renameEnabled",
    }  # fmt: skip
    SIGNALS = FakeMRMLWidget.SIGNALS | {
        "currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)",
        "currentNodeIDChanged(QString)",
    }  # fmt: skip

    def __init__(self, name: str, properties: dict) -> None:
        super().__init__(name, properties)
        object.__setattr__(self, "_node", None)

    def currentNode(self):  # noqa: N802
        return self._node

    def setCurrentNode(self, node) -> None:  # noqa: N802
        if node is not self._node:
            object.__setattr__(self, "_node", node)
            self.emit("currentNodeChanged(vtkMRMLNode*)", node)


class FakeSegmentSelector(FakeNodeComboBox):
    """Like ``qMRMLSegmentSelectorWidget::populateSegmentCombobox``
    (``Libs/MRML/Widgets/qMRMLSegmentSelectorWidget.cxx``): on a new segmentation with
    segments, a current segment ID it lacks (or no ID without "None") is replaced by
    its first segment, and ``currentSegmentChanged`` is emitted."""

    PROPERTIES = FakeWidget.PROPERTIES | {"segmentationNodeSelectorVisible", "noneEnabled"}
    SIGNALS = FakeNodeComboBox.SIGNALS | {"currentSegmentChanged(QString)"}

    def __init__(self, name: str, properties: dict) -> None:
        super().__init__(name, properties)
        object.__setattr__(self, "_segment_id", "")

    def setCurrentNode(self, node) -> None:  # noqa: N802
        changed = node is not self._node
        super().setCurrentNode(node)
        if not changed or node is None:
            return
        ids = list(node.GetSegmentation().GetSegmentIDs())
        keep = (self.noneEnabled and not self._segment_id) or self._segment_id in ids
        if ids and not keep:
            self.setCurrentSegmentID(ids[0])

    def currentSegmentID(self) -> str:  # noqa: N802
        return self._segment_id

    def setCurrentSegmentID(self, segment_id: str) -> None:  # noqa: N802
        if segment_id != self._segment_id:
            object.__setattr__(self, "_segment_id", segment_id)
            self.emit("currentSegmentChanged(QString)", segment_id)


class FakePlaceWidget(FakeMRMLWidget):
    PROPERTIES = FakeWidget.PROPERTIES | {"placeMultipleMarkups"}
    SIGNALS = FakeMRMLWidget.SIGNALS | {"activeMarkupsFiducialPlaceModeChanged(bool)"}

    def __init__(self, name: str, properties: dict) -> None:
        super().__init__(name, properties)
        object.__setattr__(self, "_node", None)

    def currentNode(self):  # noqa: N802
        return self._node

    def setCurrentNode(self, node) -> None:  # noqa: N802
        object.__setattr__(self, "_node", node)


class FakeTableWidget(FakeWidget):
    """Rows of cells (``items[(row, column)]``); ``currentRow()`` follows ``selectRow``."""

    SIGNALS = frozenset({"cellDoubleClicked(int,int)", "cellClicked(int,int)"})

    def __init__(self, name: str, properties: dict) -> None:
        super().__init__(name, properties)
        for key, value in (("items", {}), ("rows", 0), ("columns", 0), ("headers", [])):
            object.__setattr__(self, key, value)
        object.__setattr__(self, "_current", -1)
        object.__setattr__(self, "settings", {})

    def setColumnCount(self, n: int) -> None:  # noqa: N802
        object.__setattr__(self, "columns", int(n))

    def setRowCount(self, n: int) -> None:  # noqa: N802
        object.__setattr__(self, "rows", int(n))
        for key in [k for k in self.items if k[0] >= n]:
            del self.items[key]

    def rowCount(self) -> int:  # noqa: N802
        return self.rows

    def setHorizontalHeaderLabels(self, labels) -> None:  # noqa: N802
        object.__setattr__(self, "headers", list(labels))

    def setEditTriggers(self, value) -> None:  # noqa: N802
        self.settings["editTriggers"] = value

    def setSelectionBehavior(self, value) -> None:  # noqa: N802
        self.settings["selectionBehavior"] = value

    def setItem(self, row: int, column: int, item) -> None:  # noqa: N802
        if not (0 <= row < self.rows and 0 <= column < self.columns):
            return  # Qt ignores cells outside the table
        self.items[(row, column)] = item

    def item(self, row: int, column: int):
        return self.items.get((row, column))

    def currentRow(self) -> int:  # noqa: N802
        return self._current

    def selectRow(self, row: int) -> None:  # noqa: N802
        object.__setattr__(self, "_current", int(row))

    def text_rows(self) -> list[list[str]]:
        return [
            [self.items[(r, c)].text() if (r, c) in self.items else "" for c in range(self.columns)]
            for r in range(self.rows)
        ]


FAKE_WIDGET_CLASSES = {
    "qMRMLWidget": FakeMRMLWidget,
    "QWidget": FakeWidget,
    "QLabel": FakeLabel,
    "QPushButton": FakeButton,
    "QCheckBox": FakeCheckBox,
    "QComboBox": FakeComboBox,
    "QLineEdit": FakeLineEdit,
    "QSpinBox": FakeSpinBox,
    "QDoubleSpinBox": FakeSpinBox,
    "QProgressBar": FakeProgressBar,
    "QTableWidget": FakeTableWidget,
    "ctkCollapsibleButton": FakeCollapsibleButton,
    "ctkPathLineEdit": FakePathLineEdit,
    "qMRMLNodeComboBox": FakeNodeComboBox,
    "qMRMLSegmentSelectorWidget": FakeSegmentSelector,
    "qSlicerMarkupsPlaceWidget": FakePlaceWidget,
}


def _ui_value(prop):
    """A Designer ``<property>``'s value as Python (bool, number, string; else None)."""
    for child in prop:
        text = child.text or ""
        if child.tag == "bool":
            return text == "true"
        if child.tag == "number":
            return int(text)
        if child.tag == "double":
            return float(text)
        if child.tag in ("string", "enum"):
            return text
        if child.tag == "stringlist":
            return [s.text or "" for s in child.findall("string")]
    return None


def load_fake_ui(path) -> FakeMRMLWidget:
    """Parse a Designer file: the top widget, with ``children`` {objectName: fake widget}.
    Unknown widget classes raise KeyError (add them to ``FAKE_WIDGET_CLASSES``)."""
    import xml.etree.ElementTree as ElementTree

    root = ElementTree.parse(path).getroot().find("widget")
    children = {}
    for element in root.iter("widget"):
        properties = {p.get("name"): _ui_value(p) for p in element.findall("property")}
        fake = FAKE_WIDGET_CLASSES[element.get("class")](element.get("name"), properties)
        children[element.get("name")] = fake
    top = children[root.get("name")]
    object.__setattr__(top, "children", children)
    return top


def held_sleep(seconds: float) -> None:
    """Sleep *keeping the GIL*, as Slicer's main thread does while Qt idles: neither
    Slicer nor CTK enables PythonQt's thread support, so no ``PyEval_SaveThread`` runs
    around Qt's event loop (docs/slicer.md). ``usleep`` through ``ctypes.PyDLL`` is a
    C call made without releasing the GIL (``ctypes.CDLL`` would release it)."""
    if seconds > 0:
        _LIBC.usleep(int(seconds * 1e6))


_LIBC = ctypes.PyDLL(None)


def make_fake_qt() -> types.ModuleType:
    """A ``qt`` module with the classes the Widget uses. State lives on the module
    object: ``timers`` (every QTimer made), ``single_shots`` (pending
    ``QTimer.singleShot`` calls), ``dialogs`` (every QProgressDialog), ``processes``
    (every QProcess), and ``pump()`` runs the pending single shots and fires every
    active timer once. ``run(seconds, until)`` is Slicer's event loop: timers fire when
    due, processes' pipes are read, and in between the main thread idles holding the
    GIL (:func:`held_sleep`); every callback's duration is appended to ``callbacks``
    (wall time) and ``cpu`` (the thread's CPU time) as ``(name, seconds)``."""
    qt = types.ModuleType("qt")
    qt.timers, qt.single_shots, qt.dialogs, qt.processes = [], [], [], []
    qt.callbacks, qt.cpu = [], []

    def timed(name: str, slot, args: tuple) -> None:
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            call_slot(slot, args)
        finally:
            qt.callbacks.append((name, time.perf_counter() - started))
            qt.cpu.append((name, time.thread_time() - cpu))

    class QTimer:
        def __init__(self, parent=None) -> None:
            self.interval, self.single, self.active, self.starts = 0, False, False, 0
            self.slots: list = []
            self.due = 0.0
            qt.timers.append(self)

        def setInterval(self, ms: int) -> None:  # noqa: N802
            self.interval = int(ms)

        def setSingleShot(self, on: bool) -> None:  # noqa: N802
            self.single = bool(on)

        def isActive(self) -> bool:  # noqa: N802
            return self.active

        def start(self, ms: int | None = None) -> None:
            if ms is not None:
                self.interval = int(ms)
            self.active, self.starts = True, self.starts + 1
            self.due = time.monotonic() + self.interval / 1000

        def stop(self) -> None:
            self.active = False

        def connect(self, signal: str, slot) -> bool:
            if signal != "timeout()":
                raise ValueError(f"QTimer has no signal {signal}")
            self.slots.append(slot)
            return True

        def fire(self) -> None:
            if self.single:
                self.active = False
            for slot in list(self.slots):
                call_slot(slot, ())

        @staticmethod
        def singleShot(ms: int, slot) -> None:  # noqa: N802
            qt.single_shots.append(slot)
            qt.shot_due[id(slot)] = time.monotonic() + ms / 1000

    qt.shot_due = {}

    def pump() -> None:
        shots, qt.single_shots[:] = list(qt.single_shots), []
        for slot in shots:
            call_slot(slot, ())
        for timer in list(qt.timers):
            if timer.active:
                timer.fire()

    def run(seconds: float, until=None) -> bool:
        """The event loop for ``seconds`` or until ``until()`` is true (returned)."""
        end = time.monotonic() + seconds
        while True:
            if until is not None and until():
                return True
            now = time.monotonic()
            if now >= end:
                return False
            for slot in list(qt.single_shots):
                if qt.shot_due.get(id(slot), 0) <= now:
                    qt.single_shots.remove(slot)
                    qt.shot_due.pop(id(slot), None)
                    timed("singleShot", slot, ())
            for timer in list(qt.timers):
                if timer.active and timer.due <= now:
                    timer.due = now + timer.interval / 1000
                    if timer.single:
                        timer.active = False
                    for slot in list(timer.slots):
                        timed(getattr(slot, "__name__", "timer"), slot, ())
            for process in list(qt.processes):
                process.service(timed)
            if until is not None and until():  # a slot just ran finished it: no sleep
                return True
            dues = [t.due for t in qt.timers if t.active]
            dues += [qt.shot_due.get(id(s), now) for s in qt.single_shots]
            if any(p.watching for p in qt.processes):
                dues.append(now + 0.005)  # Qt would wake on the pipe at once
            held_sleep(max(0.0, min([end, *dues]) - time.monotonic()))

    class _Bytes:
        def __init__(self, data: bytes) -> None:
            self._data = data

        def data(self) -> bytes:
            return self._data

    class QProcessEnvironment:
        def __init__(self, values: dict) -> None:
            self.values = dict(values)

        @staticmethod
        def systemEnvironment():  # noqa: N802
            return QProcessEnvironment(os.environ)

        def value(self, key: str, default: str = "") -> str:
            return self.values.get(key, default)

        def insert(self, key: str, value: str) -> None:
            self.values[key] = str(value)

    class QProcess:
        """Over ``subprocess.Popen``; its pipes are read (non-blocking) and its signals
        emitted by ``run``'s loop on the main thread, as Qt's event loop does."""

        NotRunning, Starting, Running = 0, 1, 2
        FailedToStart, Crashed = 0, 1

        def __init__(self, parent=None) -> None:
            self.slots: dict[str, list] = {}
            self.environment = None
            self.popen = None
            self.watching = False
            self._out, self._err = b"", b""
            qt.processes.append(self)

        def connect(self, signal: str, slot) -> bool:
            self.slots.setdefault(signal, []).append(slot)
            return True

        def setProcessEnvironment(self, environment) -> None:  # noqa: N802
            self.environment = environment

        def start(self, program: str, arguments) -> None:
            env = None if self.environment is None else self.environment.values
            try:
                self.popen = subprocess.Popen(
                    [program, *arguments], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
                )
            except OSError:
                qt.single_shots.append(lambda: self._emit("errorOccurred", self.FailedToStart))
                return
            for pipe in (self.popen.stdout, self.popen.stderr):
                os.set_blocking(pipe.fileno(), False)
            self.watching = True

        def processId(self) -> int:  # noqa: N802
            return 0 if self.popen is None else self.popen.pid

        def state(self) -> int:
            if self.popen is None or not self.watching:
                return self.NotRunning
            return self.Running

        def terminate(self) -> None:
            if self.popen is not None and self.popen.poll() is None:
                self.popen.terminate()

        def kill(self) -> None:
            if self.popen is not None and self.popen.poll() is None:
                self.popen.kill()

        def readAllStandardOutput(self):  # noqa: N802
            data, self._out = self._out, b""
            return _Bytes(data)

        def readAllStandardError(self):  # noqa: N802
            data, self._err = self._err, b""
            return _Bytes(data)

        def _emit(self, name: str, *args, timed_call=None) -> None:
            for signal, slots in self.slots.items():
                if signal.split("(")[0] == name:
                    for slot in list(slots):
                        if timed_call is None:
                            call_slot(slot, args)
                        else:
                            timed_call(name, slot, args)

        @staticmethod
        def _read(pipe) -> bytes:
            chunks = []
            while True:
                try:
                    chunk = pipe.read(65536)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)

        def service(self, timed_call) -> None:
            """Read what the pipes hold; emit the signals Qt would."""
            if not self.watching:
                return
            exited = self.popen.poll() is not None  # read after: nothing is lost
            out, err = self._read(self.popen.stdout), self._read(self.popen.stderr)
            if out:
                self._out += out
                self._emit("readyReadStandardOutput", timed_call=timed_call)
            if err:
                self._err += err
                self._emit("readyReadStandardError", timed_call=timed_call)
            if exited:
                self.watching = False
                code = self.popen.returncode
                status = self.Crashed if code < 0 else 0
                self._emit("finished", max(code, 0) if status == 0 else code, status,
                           timed_call=timed_call)  # fmt: skip

        def close(self) -> None:
            """Test clean-up: end the process and close its pipes."""
            if self.popen is not None:
                self.kill()
                self.popen.wait(10)
                self.popen.stdout.close()
                self.popen.stderr.close()
            self.watching = False

    class QKeySequence:
        NoMatch, PartialMatch, ExactMatch = 0, 1, 2

        def __init__(self, text: str = "") -> None:
            self.text = str(text)

        def toString(self) -> str:  # noqa: N802
            return self.text

        def isEmpty(self) -> bool:  # noqa: N802
            return not self.text

        def matches(self, other) -> int:
            same = bool(self.text) and self.text == other.text
            return self.ExactMatch if same else self.NoMatch

        def __eq__(self, other) -> bool:
            return isinstance(other, QKeySequence) and self.text == other.text

        __hash__ = None

    class QShortcut:
        def __init__(self, keys, parent=None) -> None:
            self.key, self.parent, self.enabled, self.slots = keys, parent, True, []
            if parent is not None and hasattr(parent, "shortcuts"):
                parent.shortcuts.append(self)  # findChildren sees it

        def connect(self, signal: str, slot) -> bool:
            if signal != "activated()":
                raise ValueError(f"QShortcut has no signal {signal}")
            self.slots.append(slot)
            return True

        def setEnabled(self, on: bool) -> None:  # noqa: N802
            self.enabled = bool(on)

        def isEnabled(self) -> bool:  # noqa: N802
            return self.enabled

        def setParent(self, parent) -> None:  # noqa: N802
            if self.parent is not None and self in getattr(self.parent, "shortcuts", []):
                self.parent.shortcuts.remove(self)
            self.parent = parent

        def press(self) -> None:
            """The user presses the keys: the slots run if the shortcut is enabled."""
            if self.enabled:
                for slot in list(self.slots):
                    call_slot(slot, ())

    class QAction:
        def __init__(self, text: str = "", shortcut: str = "") -> None:
            self.text, self.shortcut, self.enabled, self.triggered = (
                text,
                QKeySequence(shortcut),
                True,
                0,
            )

        def setShortcut(self, keys) -> None:  # noqa: N802
            self.shortcut = keys

        def trigger(self) -> None:
            self.triggered += 1

    class QProgressDialog:
        def __init__(self, label="", cancel="", minimum=0, maximum=100, parent=None) -> None:
            self.label, self.maximum, self.values, self.calls = label, maximum, [], []
            self.closed = False
            qt.dialogs.append(self)

        def setWindowTitle(self, title) -> None:  # noqa: N802
            self.calls.append(("setWindowTitle", title))

        def setCancelButton(self, button) -> None:  # noqa: N802
            self.calls.append(("setCancelButton", button))

        def setMinimumDuration(self, ms) -> None:  # noqa: N802
            self.calls.append(("setMinimumDuration", ms))

        def setLabelText(self, text) -> None:  # noqa: N802
            self.label = text

        def setValue(self, value) -> None:  # noqa: N802
            self.values.append(value)

        def close(self) -> None:
            self.closed = True

    class QTableWidgetItem:
        def __init__(self, text: str = "") -> None:
            self._text, self.background = str(text), None

        def text(self) -> str:
            return self._text

        def setBackground(self, brush) -> None:  # noqa: N802
            self.background = brush

    class QHBoxLayout:
        def __init__(self, parent=None) -> None:
            self.widgets: list = []

        def addWidget(self, widget) -> None:  # noqa: N802
            self.widgets.append(widget)

    qt.QPushButton = lambda text="", parent=None: FakeButton("", {"text": text})
    qt.QLabel = lambda text="", parent=None: FakeLabel("", {"text": text})
    qt.QHBoxLayout = QHBoxLayout
    qt.QIcon = lambda path="": types.SimpleNamespace(path=path)
    qt.QTimer, qt.QKeySequence, qt.QShortcut, qt.QAction = QTimer, QKeySequence, QShortcut, QAction
    qt.QProgressDialog, qt.QTableWidgetItem, qt.pump = QProgressDialog, QTableWidgetItem, pump
    qt.run, qt.QProcess, qt.QProcessEnvironment = run, QProcess, QProcessEnvironment
    qt.settings = {}

    class QSettings:
        """The application settings: one dict (``qt.settings``) for every instance."""

        def value(self, key: str, default=None):
            return qt.settings.get(key, default)

        def setValue(self, key: str, value) -> None:  # noqa: N802
            qt.settings[key] = value

    qt.QSettings = QSettings
    qt.QAbstractItemView = types.SimpleNamespace(NoEditTriggers=0, SelectRows=1)
    qt.QMessageBox = types.SimpleNamespace(Ok=0x400, Cancel=0x400000, Yes=0x4000, No=0x10000)
    qt.QBrush = lambda color: types.SimpleNamespace(color=color)
    qt.QColor = lambda *rgb: types.SimpleNamespace(rgb=rgb)
    qt.Qt = types.SimpleNamespace(WaitCursor=3)
    return qt


class FakeLayoutManager:
    """Slicer's layout manager over real ``vtkMRMLSliceNode`` / ``vtkMRMLSliceCompositeNode``
    (Red axial, Yellow sagittal, Green coronal) in the scene; ``layouts`` records
    ``setLayout``."""

    ORIENTATIONS = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}

    def __init__(self, scene) -> None:
        self.layouts: list[int] = []
        self.widgets = {}
        for name, orientation in self.ORIENTATIONS.items():
            node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
            node.SetName(name)
            node.SetLayoutName(name)
            node.SetSingletonTag(name)
            node.SetOrientation(orientation)
            composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
            composite.SetLayoutName(name)
            self.widgets[name] = types.SimpleNamespace(
                mrmlSliceNode=lambda n=node: n, mrmlSliceCompositeNode=lambda c=composite: c
            )

    def setLayout(self, layout: int) -> None:  # noqa: N802
        self.layouts.append(layout)

    def sliceViewNames(self) -> list[str]:  # noqa: N802
        return list(self.widgets)

    def sliceWidget(self, name: str):  # noqa: N802
        return self.widgets[name]


class FakeApp:
    """``slicer.app``: a temporary folder, a layout manager, counted ``processEvents`` and
    override-cursor depth (``cursor_depth`` must come back to 0)."""

    def __init__(self, scene, temporary: str) -> None:
        self.temporaryPath = temporary
        self._layout = FakeLayoutManager(scene)
        self.processed, self.cursor_depth = 0, 0
        self.connections: list = []  # (signal, slot) connected on the application

    def connect(self, signal: str, slot) -> bool:
        self.connections.append((signal, slot))
        return True

    def emit(self, signal: str) -> None:
        for name, slot in list(self.connections):
            if name == signal:
                slot()

    def layoutManager(self):  # noqa: N802
        return self._layout

    def processEvents(self) -> None:  # noqa: N802
        self.processed += 1

    def testingEnabled(self) -> bool:  # noqa: N802
        return False

    def setOverrideCursor(self, cursor) -> None:  # noqa: N802
        self.cursor_depth += 1

    def restoreOverrideCursor(self) -> None:  # noqa: N802
        self.cursor_depth -= 1


def install_gui_stand_in(monkeypatch, temporary: str, confirm: bool = True):
    """Put the stand-in in place for one test (``monkeypatch`` undoes it): ``qt`` (in
    ``sys.modules`` and as the Widget module's ``qt``), ``slicer.app``, ``slicer.util`` loadUI /
    childWidgetVariables / mainWindow, the message boxes (recorded in ``dialogs`` as
    ``(kind, text)``; ``confirmOkCancelDisplay`` answers ``confirm``), the module's
    ``run_pip`` (in the Widget module; arguments recorded in ``pip``, answering ``pip_result``) and
    ``slicer.qSlicerMarkupsPlaceWidget``. The main window holds one "Edit > Undo"
    QAction on Ctrl+Z (``undo_action``) and the QShortcuts made on it (``shortcuts``)."""
    import sys

    import slicer

    qt = make_fake_qt()
    gui = types.SimpleNamespace(qt=qt, dialogs=[], pip=[], confirm=confirm, ui=None)
    gui.app = FakeApp(slicer.mrmlScene, temporary)
    gui.undo_action = qt.QAction("Undo", "Ctrl+Z")
    gui.main_window = types.SimpleNamespace(shortcuts=[])  # QShortcut children
    gui.main_window.findChildren = lambda cls: [
        child for child in (gui.undo_action, *gui.main_window.shortcuts) if isinstance(child, cls)
    ]

    def load_ui(path):
        gui.ui = load_fake_ui(path)
        return gui.ui

    def record(kind):
        def display(text, *args, **kwargs):
            gui.dialogs.append((kind, str(text)))
            return gui.confirm if kind == "confirm" else None

        return display

    monkeypatch.setitem(sys.modules, "qt", qt)
    widget_module = helper_module("widget")
    monkeypatch.setattr(widget_module, "qt", qt)
    monkeypatch.setattr(slicer, "app", gui.app, raising=False)
    monkeypatch.setattr(
        slicer, "qSlicerMarkupsPlaceWidget",
        types.SimpleNamespace(ForcePlaceMultipleMarkups=2), raising=False,
    )  # fmt: skip
    util = slicer.util
    monkeypatch.setattr(util, "loadUI", load_ui)
    monkeypatch.setattr(
        util, "childWidgetVariables", lambda top: types.SimpleNamespace(**top.children)
    )
    monkeypatch.setattr(util, "mainWindow", lambda: gui.main_window)
    for kind in ("error", "warning", "info", "confirm"):
        name = "confirmOkCancelDisplay" if kind == "confirm" else f"{kind}Display"
        monkeypatch.setattr(util, name, record(kind))
    gui.pip_result = (0, "Successfully installed")  # (exit code, output) of each pip run

    def run_pip(arguments):
        gui.pip.append(list(arguments))
        return gui.pip_result

    monkeypatch.setattr(widget_module, "run_pip", run_pip)
    return gui


def segmentation_node_from_file(scene, path):
    storage = scene.slicer.vtkMRMLSegmentationStorageNode()
    scene.scene.AddNode(storage)
    node = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node


def segment_on_grid(scene, node, segment_id, reference_node) -> np.ndarray:
    """One segment as a KJI bool mask on the reference volume's grid, via Slicer's export."""
    import vtk

    labelmap_node = scene.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    assert scene.segmentations.ExportSegmentsToLabelmapNode(
        node, ids, labelmap_node, reference_node
    )
    np.testing.assert_allclose(
        ijk_to_ras_of(labelmap_node), ijk_to_ras_of(reference_node), atol=1e-9
    )
    return scene.slicer.util.arrayFromVolume(labelmap_node) > 0


# --- Segment Editor effect stand-in: the C++ adaptor over Slicer's real editor logic ----
#
# ``qSlicerSegmentEditorScriptedEffect`` forwards a scripted effect's calls to its base
# ``qSlicerSegmentEditorAbstractEffect``, which hands masking, writes and undo to a
# ``vtkSlicerSegmentEditorLogic`` (``qMRMLSegmentEditorWidget.cxx``: one logic, given to
# every effect by ``setSegmentEditorLogic``). slicer-core has that logic, so the stand-in
# below is only the thin adaptor: what a test checks about masking, overwrite and undo
# is Slicer's own behaviour.


class FakeScriptedEffect:
    """``qSlicerSegmentEditorScriptedEffect`` over a real ``vtkSlicerSegmentEditorLogic``
    (``editor_logic``; bind one with :meth:`bind`). ``options`` records the widgets the
    effect adds to its options frame."""

    def __init__(self, parent=None) -> None:
        self.name, self.perSegment, self.requireSegments = "UnnamedScriptedEffect", True, False
        self.options: list = []
        self.editor_logic = None
        self.writes: list = []  # (segment ID, extent) of each write, in order
        self.python_source = None
        self._self = None

    def setPythonSource(self, path: str) -> bool:  # noqa: N802
        """As ``qSlicerSegmentEditorScriptedEffect::setPythonSource``: module name = the
        folder's name, class name = the file's base name (``...Effect``); the class is
        taken from an already imported module of that name, else the file is loaded as
        that module; ``slicer.<module name>`` is set to the instance."""
        import importlib.util
        import sys

        import slicer

        module_name = Path(path).parent.name
        class_name = (
            Path(path).stem if Path(path).stem.endswith("Effect") else Path(path).stem + "Effect"
        )
        module = sys.modules.get(module_name)
        if module is None or not hasattr(module, class_name):
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        self._self = getattr(module, class_name)(self)
        self.python_source = path
        setattr(slicer, module_name, self._self)
        return True

    def self(self):
        return self._self

    def bind(self, editor_logic) -> None:
        self.editor_logic = editor_logic
        self._self.setMRMLDefaults()

    # parameters live on the editor node as "<effect name>.<name>" attributes
    def parameterSetNode(self):  # noqa: N802
        return self.editor_logic.GetSegmentEditorNode()

    def parameter(self, name: str) -> str:
        node = self.parameterSetNode()
        value = node.GetAttribute(f"{self.name}.{name}")
        return value if value is not None else (node.GetAttribute(name) or "")

    def setParameter(self, name: str, value) -> None:  # noqa: N802
        self.parameterSetNode().SetAttribute(f"{self.name}.{name}", str(value))

    def setParameterDefault(self, name: str, value) -> None:  # noqa: N802
        if not self.parameterSetNode().GetAttribute(f"{self.name}.{name}"):
            self.setParameter(name, value)

    def integerParameter(self, name: str) -> int:  # noqa: N802
        return int(self.parameter(name) or 0)

    def doubleParameter(self, name: str) -> float:  # noqa: N802
        return float(self.parameter(name) or 0.0)

    def addOptionsWidget(self, widget) -> None:  # noqa: N802
        self.options.append(widget)

    def addLabeledOptionsWidget(self, label: str, widget) -> None:  # noqa: N802
        self.options.append((label, widget))

    def confirmCurrentSegmentVisible(self) -> int:  # noqa: N802
        return 1

    # the editor's images and writes: the real logic
    def defaultModifierLabelmap(self):  # noqa: N802
        ok = self.editor_logic.ResetModifierLabelmapToDefault()
        return self.editor_logic.GetModifierLabelmap() if ok else None

    def selectedSegmentLabelmap(self):  # noqa: N802
        ok = self.editor_logic.UpdateSelectedSegmentLabelmap()
        return self.editor_logic.GetSelectedSegmentLabelmap() if ok else None

    def referenceGeometryImage(self):  # noqa: N802
        ok = self.editor_logic.UpdateReferenceGeometryImage()
        return self.editor_logic.GetReferenceGeometryImage() if ok else None

    def sourceVolumeImageData(self):  # noqa: N802
        ok = self.editor_logic.UpdateAlignedSourceVolume()
        return self.editor_logic.GetAlignedSourceVolume() if ok else None

    def saveStateForUndo(self) -> None:  # noqa: N802
        self.editor_logic.SaveStateForUndo()

    def modifySelectedSegmentByLabelmap(self, labelmap, mode, extent=None, bypass=False):  # noqa: N802
        """The overloads Python can call: ``(labelmap, mode[, bypass])`` and
        ``(labelmap, mode, QList<int> extent[, bypass])``."""
        if isinstance(extent, bool):
            extent, bypass = None, extent
        node = self.parameterSetNode()
        self._modify(
            node.GetSegmentationNode(), node.GetSelectedSegmentID() or "", labelmap, mode,
            extent, bypass,
        )  # fmt: skip

    def modifySegmentByLabelmap(self, segmentation, segment_id, labelmap, mode, bypass=False):  # noqa: N802
        """Only ``(node, id, labelmap, mode[, bypass])`` from Python: the overload with an
        extent takes ``const int[6]``, which PythonQt does not convert from a list."""
        if not isinstance(bypass, bool):
            raise TypeError("modifySegmentByLabelmap takes no extent from Python")
        self._modify(segmentation, segment_id, labelmap, mode, None, bypass)

    def _modify(self, segmentation, segment_id, labelmap, mode, extent, bypass) -> None:
        extent = [0, -1, 0, -1, 0, -1] if extent is None else [int(v) for v in extent]
        self.editor_logic.ModifySegmentByLabelmap(
            segmentation, segment_id, labelmap, mode, extent, self.perSegment, bypass
        )
        self.writes.append((segment_id, list(extent)))

    def xyToRas(self, xy, view_widget):  # noqa: N802
        """``qSlicerSegmentEditorAbstractEffect::xyToRas``: the slice node's XYToRAS."""
        matrix = view_widget.mrmlSliceNode().GetXYToRAS()
        ras = matrix.MultiplyPoint([float(xy[0]), float(xy[1]), 0.0, 1.0])
        return types.SimpleNamespace(x=lambda: ras[0], y=lambda: ras[1], z=lambda: ras[2])


class FakeSliceWidget:
    """A ``qMRMLSliceWidget`` as an effect sees it: its class name and slice node."""

    def __init__(self, slice_node) -> None:
        self._node = slice_node

    def className(self) -> str:  # noqa: N802
        return "qMRMLSliceWidget"

    def mrmlSliceNode(self):  # noqa: N802
        return self._node


class FakeInteractor:
    """A ``vtkRenderWindowInteractor`` at one event: position (XY) and modifier keys."""

    def __init__(self, xy, shift=False, control=False, alt=False) -> None:
        self.xy, self.keys = (int(xy[0]), int(xy[1])), (shift, control, alt)

    def GetEventPosition(self):  # noqa: N802
        return self.xy

    def GetShiftKey(self) -> bool:  # noqa: N802
        return self.keys[0]

    def GetControlKey(self) -> bool:  # noqa: N802
        return self.keys[1]

    def GetAltKey(self) -> bool:  # noqa: N802
        return self.keys[2]


def install_effect_stand_in(monkeypatch) -> types.SimpleNamespace:
    """The Segment Editor's Python side for an effect (``monkeypatch`` undoes it):
    ``SegmentEditorEffects.AbstractScriptedSegmentEditorEffect`` (Slicer's base class:
    ``register`` and the coordinate helpers), ``qSlicerSegmentationsEditorEffectsPythonQt``
    (the adaptor above), ``slicer.qSlicerSegmentEditorEffectFactory`` (``registered``
    lists the effects) and ``slicer.qSlicerSegmentEditorAbstractEffect``'s modes."""
    import sys

    import slicer

    registered: list = []

    class AbstractScriptedSegmentEditorEffect:
        def __init__(self, scriptedEffect) -> None:  # noqa: N803
            self.scriptedEffect = scriptedEffect

        def register(self) -> None:
            slicer.qSlicerSegmentEditorEffectFactory.instance().registerEffect(self.scriptedEffect)

        def cleanup(self) -> None:
            pass

        def xyToRas(self, xy, viewWidget):  # noqa: N802, N803
            ras = self.scriptedEffect.xyToRas(xy, viewWidget)
            return [ras.x(), ras.y(), ras.z()]

    base = types.ModuleType("SegmentEditorEffects.AbstractScriptedSegmentEditorEffect")
    base.AbstractScriptedSegmentEditorEffect = AbstractScriptedSegmentEditorEffect
    base.__all__ = ["AbstractScriptedSegmentEditorEffect"]
    package = types.ModuleType("SegmentEditorEffects")
    package.AbstractScriptedSegmentEditorEffect = AbstractScriptedSegmentEditorEffect
    package.__path__ = []
    monkeypatch.setitem(sys.modules, "SegmentEditorEffects", package)
    monkeypatch.setitem(sys.modules, base.__name__, base)
    adaptor = types.ModuleType("qSlicerSegmentationsEditorEffectsPythonQt")
    adaptor.qSlicerSegmentEditorScriptedEffect = FakeScriptedEffect
    monkeypatch.setitem(sys.modules, adaptor.__name__, adaptor)
    factory = types.SimpleNamespace(registerEffect=registered.append, registered=registered)
    monkeypatch.setattr(
        slicer, "qSlicerSegmentEditorEffectFactory",
        types.SimpleNamespace(instance=lambda: factory), raising=False,
    )  # fmt: skip
    modes = slicer.vtkSlicerSegmentEditorLogic
    monkeypatch.setattr(
        slicer, "qSlicerSegmentEditorAbstractEffect",
        types.SimpleNamespace(
            ModificationModeSet=modes.ModificationModeSet,
            ModificationModeAdd=modes.ModificationModeAdd,
            ModificationModeRemove=modes.ModificationModeRemove,
        ),
        raising=False,
    )  # fmt: skip
    return types.SimpleNamespace(registered=registered, adaptor=adaptor)


def segment_editor(scene, segmentation, volume, segment_id: str):
    """A Segment Editor: its node (segmentation, source volume, selected segment) and
    Slicer's ``vtkSlicerSegmentEditorLogic`` on it, with its undo history."""
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(scene)
    logic.SetSegmentEditorNode(node)
    node.SetAndObserveSegmentationNode(segmentation)
    node.SetAndObserveSourceVolumeNode(volume)
    node.SetSelectedSegmentID(segment_id)
    return node, logic
