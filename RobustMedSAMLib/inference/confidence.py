"""Per-slice confidence after a 3D segmentation: which slices to check first.

Pure Python on the ``SliceScore`` list that ``segment_volume`` returns; the Slicer panel
shows these rows in its table and jumps to the unsure ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from RobustMedSAMLib.inference.segment_volume import SliceScore


@dataclass
class ConfidenceRow:
    """One slice of the confidence table. ``index``: slice along the segmentation axis;
    ``overlap`` is NaN on prompted slices; ``flagged``: the score or the overlap is under
    the user's thresholds."""

    index: int
    score: float
    overlap: float
    area: int
    source: str
    flagged: bool


def confidence_rows(
    scores: Iterable[SliceScore], min_score: float = 0.7, min_overlap: float = 0.85
) -> list[ConfidenceRow]:
    """Rows in slice order; a slice is flagged when its predicted IoU is under
    ``min_score`` or its overlap with the neighbour slice it was propagated from is
    under ``min_overlap``."""
    rows = []
    for s in sorted(scores, key=lambda s: s.index):
        low_overlap = not math.isnan(s.overlap) and s.overlap < min_overlap
        flagged = bool(s.score < min_score or low_overlap)
        rows.append(
            ConfidenceRow(
                int(s.index), float(s.score), float(s.overlap), int(s.area), s.source, flagged
            )
        )
    return rows


def next_unsure(rows: Iterable[ConfidenceRow], after: int | None = None) -> int | None:
    """The first flagged slice after slice ``after`` (wrapping round); None if none is."""
    flagged = sorted(r.index for r in rows if r.flagged)
    if not flagged:
        return None
    later = [i for i in flagged if after is None or i > after]
    return later[0] if later else flagged[0]
