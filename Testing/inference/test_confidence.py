"""The per-slice confidence table: which slices are flagged, and the next one to check."""

from __future__ import annotations

import math

from RobustMedSAMLib.inference.confidence import confidence_rows, next_unsure
from RobustMedSAMLib.inference.segment_volume import SliceScore

SCORES = [
    SliceScore(7, 0.95, 0.9, 50, "propagated"),
    SliceScore(5, 0.90, math.nan, 60, "prompt"),
    SliceScore(6, 0.40, 0.95, 55, "propagated"),
    SliceScore(8, 0.92, 0.5, 20, "propagated"),
]


def test_rows_are_in_slice_order_and_flag_low_scores_and_low_overlaps():
    rows = confidence_rows(SCORES, min_score=0.7, min_overlap=0.85)
    assert [(r.index, r.flagged) for r in rows] == [(5, False), (6, True), (7, False), (8, True)]
    assert math.isnan(rows[0].overlap) and rows[0].source == "prompt"  # a prompt has no overlap


def test_thresholds_move_the_flags():
    assert not any(r.flagged for r in confidence_rows(SCORES, min_score=0.3, min_overlap=0.4))
    assert all(r.flagged for r in confidence_rows(SCORES, min_score=0.99, min_overlap=0.0))


def test_next_unsure_walks_the_flagged_slices_and_wraps_round():
    rows = confidence_rows(SCORES, min_score=0.7, min_overlap=0.85)
    assert [next_unsure(rows, None), next_unsure(rows, 6), next_unsure(rows, 8)] == [6, 8, 6]
    assert next_unsure(list(reversed(rows)), 5) == 6  # row order does not matter
    assert next_unsure(rows[:1], None) is None
