"""Cost of one click's write through the Segment Editor effect, with 0 / 5 / 20 other
segments, against the panel's write of the same click.

Not a test (needs slicer-core; a few minutes):

    PYTHONPATH=. .venv/bin/python Testing/benchmarks/bench_effect_write.py

Same scene as ``bench_segment_write.py``: a 200 x 512 x 512 volume, other segments as
stripes through every slice. One click = the effect writing a 200 x 200 square on slice
100 of the selected segment ("overwrite all", the editor's default) through Slicer's
``vtkSlicerSegmentEditorLogic`` (the adaptor stand-in of ``slicer_headless``), after the
first click created the segment's voxels. References, measured in the same run: Slicer's
own editor "Add" of the same square into another segment (what a Paint stroke over that
area costs), and the panel's ``RobustMedSAMLogic.write_slice`` of the same click into
another segmentation. Main-thread time, rendering not included; median of 5 clicks.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slicer_headless import (  # noqa: E402
    add_volume,
    install_effect_stand_in,
    install_gui_stand_in,
    load_module_file,
    make_scene,
    segment_editor,
)

SHAPE = (200, 512, 512)
SPACING = np.diag([0.8, 0.8, 1.5, 1.0])
REPEATS = 5


def stripes(module, volume, segmentation, count: int) -> None:
    """``count`` segments, each a 200 x 30 x 300 stripe overlapping its neighbour."""
    from RobustMedSAMHelpers.mrml import _set_box  # on sys.path with the module

    for n in range(count):
        mask = np.zeros(SHAPE, bool)
        mask[:, 20 * n : 20 * n + 30, 100:400] = True
        segment_id = segmentation.GetSegmentation().AddEmptySegment(f"s{n}", f"s{n}")
        _set_box(segmentation, segment_id, volume, (slice(None),) * 3, mask)


def median_ms(click) -> float:
    click()  # the first write creates the segment's voxels
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        click()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def measure(module, count: int, patch, folder: str) -> tuple[float, float, float]:
    """``(effect ms, Slicer's add ms, panel ms)`` per click with ``count`` others."""
    from RobustMedSAMLib.inference.session import SegmentationSession
    from RobustMedSAMLib.inference.types import SliceResult

    square = np.zeros(SHAPE[1:], bool)
    square[150:350, 150:350] = True
    ns = make_scene()
    gui = install_gui_stand_in(patch, folder)
    stand_in = install_effect_stand_in(patch)
    node = add_volume(ns, np.zeros(SHAPE, np.int16), SPACING)
    logic = module.RobustMedSAMLogic()
    volume = logic.volume_from_node(node)
    segmentations = []
    for name in ("effect", "panel"):
        segmentation = ns.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(node)
        stripes(module, volume, segmentation, count)
        segmentations.append(segmentation)
    organ = segmentations[0].GetSegmentation().AddEmptySegment("organ", "organ")
    editor_node, editor_logic = segment_editor(ns.scene, segmentations[0], node, organ)
    module.RobustMedSAM(types.SimpleNamespace())
    gui.app.emit("startupCompleted()")
    effect = stand_in.registered[-1]
    effect.bind(editor_logic)
    py = effect.self()
    py.logic = logic
    target = py._target()
    effect_ms = median_ms(lambda: py._writeSlice(target, 0, 100, square))

    paint = segmentations[0].GetSegmentation().AddEmptySegment("paint", "paint")
    editor_node.SetSelectedSegmentID(paint)
    from RobustMedSAMHelpers.mrml import _oriented_box  # on sys.path with the module

    stroke = _oriented_box(volume, (slice(100, 101), slice(None), slice(None)), square[None])
    add, extent = editor_logic.ModificationModeAdd, list(stroke.GetExtent())
    slicer_ms = median_ms(
        lambda: editor_logic.ModifySegmentByLabelmap(
            segmentations[0], paint, stroke, add, extent, True, False
        )
    )

    session = SegmentationSession(volume, predictor=None, axis=0, model_id="none")
    logic._volume_nodes[session] = node
    mask = np.zeros(SHAPE, bool)
    mask[100] = square
    result = SliceResult(100, 0, mask, 1.0)
    segment_id = logic.write_slice(session, result, segmentations[1], None, True)
    panel_ms = median_ms(
        lambda: logic.write_slice(session, result, segmentations[1], segment_id, True)
    )
    return effect_ms, slicer_ms, panel_ms


def main() -> None:
    module = load_module_file()
    rows = []
    with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory() as folder:
        for count in (0, 5, 20):
            rows.append((count, *measure(module, count, patch, folder)))
    print("others  effect click (ms)  Slicer's add (ms)  panel click (ms)  effect / add")
    for count, effect_ms, slicer_ms, panel_ms in rows:
        print(
            f"{count:6d}  {effect_ms:17.1f}  {slicer_ms:17.1f}  {panel_ms:16.1f}"
            f"  {effect_ms / slicer_ms:12.2f}"
        )
    print(f"ratio 20 vs 0 others (effect): {rows[-1][1] / rows[0][1]:.2f}")


if __name__ == "__main__":
    main()
