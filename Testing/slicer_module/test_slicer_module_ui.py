"""The panel's wiring, checked without Qt: the Designer file, the parameter node, the
choice lists, and the module's self-test run headless with the default model.

What needs Slicer's GUI (signals firing, the parameter node's GUI connectors, dialogs,
slice views) is not exercised here; see the README.
"""

from __future__ import annotations

import re
import subprocess
import sys
import typing
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

pytest.importorskip("slicer", reason="slicer-core is not installed")
from slicer_headless import (  # noqa: E402
    HELPER_FILES,
    MODULE_FILE,
    Choice,
    WithinRange,
    helper_module,
    load_module_file,
    make_fake_qt,
    slicer_scene_fixture,
)

module = load_module_file()
slicer_scene = pytest.fixture(slicer_scene_fixture)
UI_FILE = MODULE_FILE.parent / "Resources" / "UI" / "RobustMedSAM.ui"
logic_module = helper_module("logic")
WIDGET_SOURCE = HELPER_FILES["widget"].read_text()
SOURCE = MODULE_FILE.read_text() + "".join(p.read_text() for p in HELPER_FILES.values())

QT_CLASSES = {
    "QWidget", "QLabel", "QPushButton", "QComboBox", "QCheckBox", "QSpinBox",
    "QDoubleSpinBox", "QProgressBar", "QTableWidget", "QLineEdit",
}  # fmt: skip
MRML_WIDGETS = {"qMRMLNodeComboBox", "qMRMLSegmentSelectorWidget", "qSlicerMarkupsPlaceWidget"}
UNBOUND_PARAMETERS = {
    # kept in sync by the Widget's own handlers (no parameter-node connector for them)
    "segment_id": "segmentSelector",
    "checkpoint_path": "checkpointPathLineEdit",
    "finetune_data_folder": "finetuneDataPathLineEdit",
    "finetune_config": "finetuneConfigPathLineEdit",
    "finetune_output": "finetuneOutputPathLineEdit",
}


def ui_tree() -> ElementTree.Element:
    return ElementTree.parse(UI_FILE).getroot()


def widgets() -> dict[str, ElementTree.Element]:
    return {w.get("name"): w for w in ui_tree().iter("widget")}


def parameter_name(widget: ElementTree.Element) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == "SlicerParameterName":
            return prop.findtext("string")
    return None


def parameter_fields() -> dict[str, typing.Any]:
    return typing.get_type_hints(
        module.RobustMedSAMParameterNode, vars(logic_module), include_extras=True
    )


def test_ui_is_a_designer_file_for_a_mrml_widget():
    root = ui_tree()
    assert root.tag == "ui" and root.findtext("class") == "RobustMedSAM"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "RobustMedSAM"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "widget names must be unique"


def test_every_widget_the_code_uses_exists_in_the_ui():
    used = set(re.findall(r"self\.ui\.([A-Za-z_]\w*)", SOURCE))
    missing = used - set(widgets())
    assert len(used) > 30 and not missing, missing


def test_every_custom_widget_class_is_declared():
    root = ui_tree()
    declared = {c.findtext("class"): c for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")} - QT_CLASSES
    assert used <= set(declared), used - set(declared)
    for name, entry in declared.items():
        assert entry.findtext("header") == f"{name}.h"
        assert entry.findtext("extends") in QT_CLASSES | set(declared)


def test_mrml_widgets_receive_the_scene():
    receivers = {
        c.findtext("receiver")
        for c in ui_tree().iter("connection")
        if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    needing = {name for name, w in widgets().items() if w.get("class") in MRML_WIDGETS}
    assert needing and needing <= receivers, needing - receivers


def connector_class(annotation) -> str:
    """The widget class Slicer's parameter-node GUI connectors pair with a field type."""
    base = typing.get_origin(annotation) and typing.get_args(annotation)[0] or annotation
    extras = typing.get_args(annotation)[1:] if typing.get_origin(annotation) else ()
    if isinstance(base, type) and base.__name__.startswith("vtkMRML"):
        return "qMRMLNodeComboBox"
    if base is str and any(isinstance(e, Choice) for e in extras):
        return "QComboBox"
    return {bool: "QCheckBox", int: "QSpinBox", float: "QDoubleSpinBox", str: "QLineEdit"}[base]


def test_parameter_node_fields_map_to_widgets_of_the_right_class():
    fields = parameter_fields()
    bound = {parameter_name(w): w for w in widgets().values() if parameter_name(w)}
    unknown = set(bound) - set(fields)
    assert not unknown, f"SlicerParameterName without a field: {unknown}"
    for name, annotation in fields.items():
        if name in UNBOUND_PARAMETERS:
            assert name not in bound and UNBOUND_PARAMETERS[name] in widgets()
            assert f".{name}" in SOURCE  # the Widget syncs it itself
            continue
        assert name in bound, f"parameter {name} has no widget"
        assert bound[name].get("class") == connector_class(annotation), name


def test_parameter_defaults_are_valid_choices_and_in_range():
    node_class = module.RobustMedSAMParameterNode
    for name, annotation in parameter_fields().items():
        for extra in typing.get_args(annotation)[1:]:
            default = getattr(node_class, name)
            if isinstance(extra, Choice):
                assert default in extra.choices, name
            if isinstance(extra, WithinRange):
                assert extra.minimum <= default <= extra.maximum, name


def test_choice_lists_match_the_library():
    from RobustMedSAMLib.corruptions import CORRUPTIONS
    from RobustMedSAMLib.inference.propagation import (
        OVERLAP_MEASURES,
        PROJECTIONS,
        PropagationOptions,
    )
    from RobustMedSAMLib.inference.segment_volume import SegmentOptions
    from RobustMedSAMLib.inference.slicing import AXIS_NAMES
    from RobustMedSAMLib.weights.registry import model_names

    assert set(logic_module.MODEL_NAMES) == set(model_names())
    assert logic_module.CORRUPTION_NAMES == tuple(CORRUPTIONS)
    assert logic_module.PROJECTIONS == PROJECTIONS
    assert set(module.OVERLAPS) == set(OVERLAP_MEASURES)
    assert module.AXES[1:] == AXIS_NAMES
    defaults, node = PropagationOptions(), module.RobustMedSAMParameterNode
    assert (node.projection, node.overlap_measure, node.stop_iou) == (
        defaults.projection,
        defaults.overlap,
        defaults.iou_threshold,
    )
    assert (node.min_score, node.min_area_ratio, node.box_extension) == (
        defaults.min_score,
        defaults.min_area_ratio,
        defaults.box_extension,
    )
    assert (node.min_likeness, node.min_stability) == (
        defaults.min_likeness,
        defaults.min_stability,
    )
    assert node.seed_box_growth == SegmentOptions().seed_box_growth
    assert node.slice_step == defaults.slice_step


def test_cmake_installs_the_ui_file():
    cmake = (MODULE_FILE.parent / "CMakeLists.txt").read_text()
    assert "Resources/UI/${MODULE_NAME}.ui" in cmake and UI_FILE.name == "RobustMedSAM.ui"


def test_module_file_imports_without_torch_or_qt():
    """Nor h11 (the server link's HTTP framing): before the dependency check installed
    it, the module must still load so that the panel can offer the installation."""
    code = (
        "import sys; sys.path.insert(0, 'Testing')\n"
        "class NoH11:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'h11':\n"
        "            raise ImportError(name)\n"
        "sys.meta_path.insert(0, NoH11())\n"
        "from slicer_headless import load_module_file\n"
        "m = load_module_file()\n"
        "from RobustMedSAMHelpers import widget\n"
        "assert widget.qt is None and 'torch' not in sys.modules, sorted(sys.modules)\n"
        "print('ok')\n"
    )
    root = MODULE_FILE.parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_module_file_does_not_import_simpleitk_at_startup():
    """Slicer imports the module file at every start; SimpleITK is loaded on first use
    (slicer-review.md, finding 12)."""
    code = (
        "import sys; sys.path.insert(0, 'Testing')\n"
        "from slicer_headless import load_module_file\n"
        "load_module_file()\n"
        "assert 'SimpleITK' not in sys.modules\n"
        "from RobustMedSAMLib.formats.volume import Volume, read_volume, sitk\n"
        "assert sitk.sitkUInt8 >= 0 and 'SimpleITK' in sys.modules\n"
        "print('ok')\n"
    )
    root = MODULE_FILE.parents[1]
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_finetune_python_is_an_interpreter():
    python = Path(module.RobustMedSAMLogic.finetune_python())
    assert python.is_file()
    assert python.name.startswith("PythonSlicer") or python == Path(sys.executable)


def test_the_self_test_passes_headless_with_the_default_model(slicer_scene, monkeypatch):
    """``RobustMedSAMTest`` as Slicer runs it, with slicer-core: the server path (a local
    LiteMedSAM server in the stand-in's QProcess, the link on its timer, the stand-in's
    event loop idling with the GIL held); the reload goes through the segmentation
    storage node instead of ``slicer.util.loadSegmentation``."""
    qt = make_fake_qt()
    monkeypatch.setitem(sys.modules, "qt", qt)

    class HeadlessTest(module.RobustMedSAMTest):
        def setUp(self) -> None:  # the fixture gave a fresh scene
            pass

        def wait_for(self, predicate, timeout: float = 600.0) -> None:
            assert qt.run(timeout, predicate), "no answer from the server"

        def reload_segmentation(self, path: Path):
            node = slicer_scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reloaded")
            storage = slicer_scene.slicer.vtkMRMLSegmentationStorageNode()
            storage.SetFileName(str(path))
            assert storage.ReadData(node)
            return node

    test = HeadlessTest("runTest")
    try:
        test.runTest()
    finally:
        for process in qt.processes:
            process.close()
    nodes = slicer_scene.scene.GetNodesByClass("vtkMRMLSegmentationNode")
    assert nodes.GetNumberOfItems() == 2
    assert [p.popen.returncode in (0, -15) for p in qt.processes] == [True]  # SIGTERM


def test_widget_calls_only_logic_methods_and_parameters_that_exist():
    widget_source = WIDGET_SOURCE
    logic_calls = set(re.findall(r"self\.logic\.([A-Za-z_]\w*)", widget_source))
    assert logic_calls and all(hasattr(module.RobustMedSAMLogic, n) for n in logic_calls), {
        n for n in logic_calls if not hasattr(module.RobustMedSAMLogic, n)
    }
    fields = set(parameter_fields())
    used = set(re.findall(r"\b(?:node|self\._parameterNode)\.([a-z_]+)\b", widget_source))
    assert len(used) > 15 and used <= fields, used - fields
