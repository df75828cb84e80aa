"""A headless slicer-core scene with the module logics, for tests.

``slicer-core`` gives Slicer's MRML, logic and segmentation classes without Qt
or ``slicer.app``. :func:`make_scene` does the set-up they need (see
``/work/shared/notes/slicer-core-headless.md``): a scene assigned to
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


class Choice:
    """Stand-in for ``slicer.parameterNodeWrapper.Choice`` (keeps the choices)."""

    def __init__(self, choices) -> None:
        self.choices = tuple(choices)


class WithinRange:
    """Stand-in for ``slicer.parameterNodeWrapper.WithinRange``."""

    def __init__(self, minimum, maximum) -> None:
        self.minimum, self.maximum = minimum, maximum


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

        class ScriptedLoadableModuleWidget:
            def __init__(self, parent=None) -> None:
                self.parent = parent

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
        wrapper.parameterNodeWrapper = lambda cls: cls
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
