"""RobustMedSAM scripted module: the module class, and Slicer's other three classes
imported by name from the helper package beside this file (Slicer looks up
``RobustMedSAMWidget``, ``RobustMedSAMLogic`` and ``RobustMedSAMTest`` in this file's
namespace, as its DICOM module does with DICOMLib):

- ``RobustMedSAMHelpers/logic.py``: ``RobustMedSAMLogic`` (MRML nodes <-> RobustMedSAMLib,
  no GUI), its parameter node and ``shared_logic()``;
- ``RobustMedSAMHelpers/widget.py``: ``RobustMedSAMWidget``, the panel;
- ``RobustMedSAMHelpers/selftest.py``: ``RobustMedSAMTest``, the end-to-end self-test;
- ``RobustMedSAMHelpers/mrml.py``, ``server_link.py``, ``server_work.py``: what they use.

The helpers never import this file. Importing it needs neither torch nor Qt: the Logic
works in slicer-core (headless tests) and in ``Slicer --no-main-window``; the Widget
needs Slicer's GUI.
"""

from __future__ import annotations

import sys
from pathlib import Path

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModule


def _library_on_path() -> None:
    """The helper package beside this file, and the library: beside this file when
    installed, beside this folder in a source checkout. (Slicer puts a scripted
    module's folder on sys.path itself; a file loaded by path, as in the tests, not.)"""
    here = Path(__file__).resolve().parent
    if str(here) not in sys.path:
        sys.path.append(str(here))
    for folder in (here, here.parent):
        if (folder / "RobustMedSAMLib" / "__init__.py").is_file():
            if str(folder) not in sys.path:
                sys.path.append(str(folder))
            return


_library_on_path()

from RobustMedSAMHelpers.logic import (  # noqa: E402
    AXES,
    FINETUNE_SOURCES,
    OVERLAPS,
    PREVIEW_SEGMENTATION_NAME,
    EditorMasking,
    RobustMedSAMLogic,
    RobustMedSAMParameterNode,
    shared_logic,
)
from RobustMedSAMHelpers.selftest import RobustMedSAMTest  # noqa: E402
from RobustMedSAMHelpers.widget import (  # noqa: E402
    ORIENTATION_AXES,
    SETTINGS_TOKEN,
    SETTINGS_URL,
    UNDO_KEYS,
    RobustMedSAMWidget,
    run_pip,
)

__all__ = [
    "AXES",
    "EFFECT_FILE",
    "EditorMasking",
    "FINETUNE_SOURCES",
    "ORIENTATION_AXES",
    "OVERLAPS",
    "PREVIEW_SEGMENTATION_NAME",
    "RobustMedSAM",
    "RobustMedSAMLogic",
    "RobustMedSAMParameterNode",
    "RobustMedSAMTest",
    "RobustMedSAMWidget",
    "SETTINGS_TOKEN",
    "SETTINGS_URL",
    "UNDO_KEYS",
    "run_pip",
    "shared_logic",
]

EFFECT_FILE = (
    Path(__file__).resolve().parent / "SegmentEditorRobustMedSAMLib" / "SegmentEditorEffect.py"
)


class RobustMedSAM(ScriptedLoadableModule):
    """Module metadata (Slicer's scripted-module convention)."""

    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "RobustMedSAM"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["RobustMedSAM contributors"]
        self.parent.helpText = (
            "Interactive 3D segmentation with a Segment Anything model whose image encoder "
            "comes from MedSAM and whose mask decoder comes from RobustSAM (robust to noise, "
            "blur and other degradations).<br>"
            "1. Choose a volume: its slices are encoded in the background.<br>"
            "2. Place include (green) / exclude (red) points or an ROI in any slice view: "
            "the segment updates on that slice after each point.<br>"
            "3. <b>Propagate</b> fills 3D; the table lists each slice's confidence, "
            "double-click a row to jump there. <b>Undo</b> (Ctrl+Z) restores the segment.<br>"
            "<b>Corruption preview</b> segments a degraded copy side by side and reports the "
            "Dice between the two masks. <b>Fine-tuning</b> trains the decoder on your "
            "segmentations in a separate process.<br>"
            "Scripts: <code>RobustMedSAMLogic</code> from the Python console, or "
            "<code>batch_segment.py</code> headless."
        )
        self.parent.acknowledgementText = (
            "Builds on Segment Anything (Meta AI), MedSAM (Ma et al., Nature Communications "
            "2024) and RobustSAM (Chen et al., CVPR 2024). Uses 3D Slicer's segmentation "
            "infrastructure."
        )
        app = getattr(slicer, "app", None)  # absent in slicer-core (headless)
        if app is not None:
            app.connect("startupCompleted()", self.registerEditorEffect)

    def registerEditorEffect(self) -> None:  # noqa: N802 (Slicer's template name)
        """Add the RobustMedSAM effect to the Segment Editor, once Slicer has started (as
        Slicer's ScriptedSegmentEditorEffect template does)."""
        import qSlicerSegmentationsEditorEffectsPythonQt as effects  # noqa: N813

        effect = effects.qSlicerSegmentEditorScriptedEffect(None)
        effect.setPythonSource(str(EFFECT_FILE).replace("\\", "/"))
        effect.self().register()
