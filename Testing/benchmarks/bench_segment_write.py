"""Cost of one click's write into a segment, with 0 / 5 / 20 other segments.

Not a test (needs slicer-core; about a minute):

    PYTHONPATH=. .venv/bin/python Testing/benchmarks/bench_segment_write.py

A 200 x 512 x 512 volume; the other segments are stripes through every slice, made as
Slicer's editor leaves them (labelmaps cropped to their extent, layers shared where
they do not overlap). One click = ``RobustMedSAMLogic.write_slice`` of a 200 x 200
square on slice 100, with "overwrite all" (the editor's default: every other segment
is read and trimmed on that slice) and with "allow overlap", into a segment the first
click created (that click also moves the segment to a layer of its own, once). This is main-thread
time in Slicer (the model's work is not included). The reference, measured in the
same run, is what the previous writer paid per other segment: one full-volume export
of a segment (``slicer.util.arrayFromSegmentBinaryLabelmap``). Prints the median of 5
clicks per case and the ratios.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from slicer_headless import add_volume, load_module_file, make_scene  # noqa: E402

SHAPE = (200, 512, 512)
SPACING = np.diag([0.8, 0.8, 1.5, 1.0])


def stripes(ns, module, volume, segmentation, count: int) -> None:
    """``count`` segments, each a 200 x 30 x 300 stripe overlapping its neighbour."""
    from RobustMedSAMHelpers.mrml import _set_box  # on sys.path with the module

    full = (slice(None),) * 3
    for n in range(count):
        mask = np.zeros(SHAPE, bool)
        mask[:, 20 * n : 20 * n + 30, 100:400] = True
        segment_id = segmentation.GetSegmentation().AddEmptySegment(f"s{n}", f"s{n}")
        _set_box(segmentation, segment_id, volume, full, mask)


def click_ms(logic, module, session, segmentation, overwrite, repeats: int = 5) -> float:
    from RobustMedSAMLib.inference.types import SliceResult

    square = np.zeros(SHAPE, bool)
    square[100, 150:350, 150:350] = True
    result = SliceResult(100, 0, square, 1.0)
    times = []
    segment_id = logic.write_slice(session, result, segmentation, None, overwrite)  # creates it
    for _ in range(repeats):
        start = time.perf_counter()
        segment_id = logic.write_slice(session, result, segmentation, segment_id, overwrite)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    from RobustMedSAMLib.inference.session import SegmentationSession

    module = load_module_file()
    rows = []
    reference_ms = None
    for count in (0, 5, 20):
        ns = make_scene()
        node = add_volume(ns, np.zeros(SHAPE, np.int16), SPACING)
        logic = module.RobustMedSAMLogic()
        volume = logic.volume_from_node(node)
        segmentation = ns.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(node)
        stripes(ns, module, volume, segmentation, count)
        session = SegmentationSession(volume, predictor=None, axis=0, model_id="none")
        logic._volume_nodes[session] = node
        if count and reference_ms is None:
            start = time.perf_counter()
            ns.slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, "s0", node)
            reference_ms = 1000 * (time.perf_counter() - start)
        overwrite = click_ms(logic, module, session, segmentation, True)
        overlap = click_ms(logic, module, session, segmentation, False)
        layers = segmentation.GetSegmentation().GetNumberOfLayers()
        rows.append((count, layers, overwrite, overlap))
    print(f"reference: one full-volume export of one segment: {reference_ms:.1f} ms")
    print("others  layers  click, overwrite all (ms)  click, allow overlap (ms)")
    for count, layers, overwrite, overlap in rows:
        print(f"{count:6d}  {layers:6d}  {overwrite:25.1f}  {overlap:25.1f}")
    worst = max(max(r[2], r[3]) for r in rows)
    print(f"ratio 20 vs 0 others (overwrite all): {rows[-1][2] / rows[0][2]:.2f}")
    print(f"ratio worst click / one old per-segment export: {worst / reference_ms:.3f}")


if __name__ == "__main__":
    main()
