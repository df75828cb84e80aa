"""bench_int8.py's selection on unlabelled data: the boxes it derives without labels and
the rule that picks the int8 configuration (NNCF itself is not run here)."""

from __future__ import annotations

import bench_int8
import numpy as np


def test_refined_box_grows_the_mask_box_by_5_px_inside_the_slice():
    mask = np.zeros((64, 64), bool)
    mask[2:20, 30:50] = True
    assert bench_int8.refined_box(mask).tolist() == [25.0, 0.0, 54.0, 24.0]


def test_refined_box_skips_specks_and_whole_slices():
    speck = np.zeros((100, 100), bool)
    speck[50, 50] = True
    assert bench_int8.refined_box(speck) is None
    assert bench_int8.refined_box(np.ones((100, 100), bool)) is None


def _row(ratio: float, *scores: float) -> dict:
    return {"ratio": ratio, "dice": np.array(scores)}


def test_select_takes_the_best_worst_case_among_fast_int8_variants():
    rows = {
        "openvino fp32": _row(0.35, 1.0, 1.0),
        "int8 a": _row(0.25, 0.95, 0.999),
        "int8 b": _row(0.28, 0.97, 0.98),
        "int8 c": _row(0.31, 0.99, 0.995),
    }
    assert bench_int8.select(rows, 0.30) == "int8 b"
    assert bench_int8.select(rows, 0.20) is None
