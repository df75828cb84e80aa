"""The RobustMedSAM module's self-test, ``RobustMedSAMTest`` (Developer mode > Reload
and Test). ``RobustMedSAM.py`` re-exports it, where Slicer looks it up by name.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModuleTest,
)

from RobustMedSAMHelpers.logic import RobustMedSAMLogic
from RobustMedSAMHelpers.mrml import (
    _vtk_matrix,
)
from RobustMedSAMLib.names import (
    DEFAULT_MODEL,
)

if TYPE_CHECKING:  # torch-heavy modules are imported when a session starts
    pass


class RobustMedSAMTest(ScriptedLoadableModuleTest):
    """End-to-end self-test in Slicer with the default model, robustmedsam-lite (Developer mode >
    Reload and Test). The same steps run headless in Testing/test_slicer_module_ui.py."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_end_to_end_with_the_default_model()

    def reload_segmentation(self, path: Path):
        """Load a .seg.nrrd as a new segmentation node (Slicer's loader)."""
        return slicer.util.loadSegmentation(str(path))

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 600.0) -> None:
        """Let Qt's events run (the server link's timer, the server process's signals)
        until ``predicate()`` holds. ``time.sleep`` releases the GIL; no thread needs it."""
        end = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > end:
                raise AssertionError(f"no answer from the server in {timeout:.0f} s")
            slicer.app.processEvents()
            time.sleep(0.01)

    def segment_through_server(self, logic, volume_node, prompts) -> tuple[np.ndarray, dict]:
        """``logic.request_segment`` (propagated), waited for: ``(mask, record)``."""
        answers: list = []
        logic.request_segment(
            volume_node,
            prompts,
            propagate=True,
            on_done=lambda mask, record: answers.append((mask, record)),
            on_error=answers.append,
        )
        self.wait_for(lambda: bool(answers))
        if isinstance(answers[0], Exception):
            raise answers[0]
        return answers[0]

    def test_end_to_end_with_the_default_model(self) -> None:
        """Local server (default model) started by the Logic -> phantom volume -> ROI
        around the ball -> propagate on the server -> written segment with Dice >= 0.8
        -> undo restores the empty segment -> save .seg.nrrd -> reload gives the same
        mask -> the server stops."""
        import tempfile

        from RobustMedSAMLib.datasets.phantoms import sphere

        self.delayDisplay("Starting the RobustMedSAM end-to-end test")
        # 4 mm slices: the ball spans 11 of them (the lite encoder: about 1.5 s each)
        phantom = sphere((14, 96, 96), (1.0, 1.0, 4.0), radius=22.0, seed=101)
        volume_node = slicer.util.addVolumeFromArray(phantom.image, name="phantom")
        volume_node.SetIJKToRASMatrix(_vtk_matrix(phantom.ijk_to_ras))
        kji = np.argwhere(phantom.mask)
        corners_ijk = np.c_[[kji.min(axis=0)[::-1] - 1.0, kji.max(axis=0)[::-1] + 1.0], [1, 1]]
        corners = (phantom.ijk_to_ras @ corners_ijk.T)[:3]
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
        roi.SetCenter(*map(float, corners.mean(axis=1)))
        roi.SetSize(*map(float, np.abs(corners[:, 1] - corners[:, 0])))
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        segment_id = segmentation.GetSegmentation().AddEmptySegment("sphere", "sphere")
        self.assertEqual(segment_id, "sphere")

        logic = RobustMedSAMLogic()
        logic.start_local_server(DEFAULT_MODEL, device="cpu")
        try:
            self.delayDisplay(f"Local server for '{DEFAULT_MODEL}' starting")
            prompts = logic.prompts_from_nodes(None, None, roi)
            mask, record = self.segment_through_server(logic, volume_node, prompts)
            logic.write_mask(segmentation, volume_node, mask, segment_id)
            mask = logic.segment_mask(segmentation, segment_id, volume_node)
            overlap = 2 * (mask & phantom.mask).sum() / (mask.sum() + phantom.mask.sum())
            self.delayDisplay(f"Dice vs truth {overlap:.3f} on {len(record['slices'])} slices")
            self.assertGreaterEqual(overlap, 0.8)
            self.assertEqual(record["inputs"]["server"], True)

            self.assertTrue(logic.undo_last(segmentation))
            self.assertFalse(logic.segment_mask(segmentation, segment_id, volume_node).any())
            self.assertIsNotNone(segmentation.GetSegmentation().GetSegment(segment_id))

            logic.write_mask(segmentation, volume_node, mask, segment_id)
            expected = logic.segment_mask(segmentation, segment_id, volume_node)
            with tempfile.TemporaryDirectory() as folder:
                path = logic.save_segmentation(segmentation, Path(folder) / "sphere.seg.nrrd")
                loaded = self.reload_segmentation(path)
                loaded_id = loaded.GetSegmentation().GetSegmentIdBySegmentName("sphere")
                reloaded = logic.segment_mask(loaded, loaded_id, volume_node)
            self.assertTrue(np.array_equal(reloaded, expected))
        finally:
            process = logic.server.local
            logic.stop_server()
            if process is not None:
                self.wait_for(lambda: not process.running, timeout=15.0)
        self.delayDisplay("RobustMedSAM end-to-end test passed")
