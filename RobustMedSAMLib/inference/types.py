"""Prompts for one 2D slice and the model's answer: the currency between the
predictor, the interactive session and 3D propagation. Numpy only.

Frame: slice pixels. A slice is a 2D array ``(rows, cols)``; a point is
``(x, y) = (col, row)`` in pixels (pixel centres at integer coordinates); a box
is ``(x0, y0, x1, y1)`` in the same frame, inclusive corners.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from RobustMedSAMLib.errors import InputError


@dataclass
class SlicePrompt:
    """What the user (or propagation) tells the model about one slice.

    points: ``Nx2`` float array of ``(x, y)`` slice pixels; labels: ``N`` ints,
    1 = include (positive), 0 = exclude (negative). box: ``(x0, y0, x1, y1)``.
    mask_input: ``1x256x256`` low-resolution logits from an earlier prediction
    on the same slice (fed back so that a click refines the mask).
    """

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    box: np.ndarray | None = None
    mask_input: np.ndarray | None = None

    def __post_init__(self) -> None:
        points = _numbers(self.points, "points")
        if points.size % 2:
            raise InputError(f"points {points.tolist()} are not (x, y) pairs of slice pixels")
        self.points = points.reshape(-1, 2)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.points) != len(self.labels):
            raise InputError(
                f"{len(self.points)} points but {len(self.labels)} labels: give one label per point"
            )
        if self.labels.size and not np.isin(self.labels, (0, 1)).all():
            raise InputError("point labels must be 1 (include) or 0 (exclude)")
        if self.box is not None:
            self.box = _numbers(self.box, "box").ravel()
            if self.box.shape != (4,):
                raise InputError(f"box {self.box.tolist()} is not 4 numbers (x0, y0, x1, y1)")
            if self.box[2] < self.box[0] or self.box[3] < self.box[1]:
                raise InputError(
                    f"box {self.box.tolist()} is not (x0, y0, x1, y1) with x0<=x1, y0<=y1"
                )

    @property
    def is_empty(self) -> bool:
        """True when there is neither a point nor a box (a mask alone is not a prompt)."""
        return len(self.points) == 0 and self.box is None

    @property
    def is_ambiguous(self) -> bool:
        """A single point with no box: SAM's case for multimask output."""
        return len(self.points) == 1 and self.box is None


def _numbers(value, name: str) -> np.ndarray:
    """``value`` as float32 slice pixels; InputError for non-numbers, NaN or infinity."""
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be numbers (slice pixels), not {value!r:.80}") from None
    if not np.isfinite(array).all():
        raise InputError(
            f"{name} {array.tolist()} has a value that is not finite: give slice pixels"
        )
    return array


@dataclass
class Prediction:
    """The model's mask for one slice.

    mask: ``(rows, cols)`` bool in slice pixels; score: the model's predicted IoU
    of that mask; low_res_logits: ``1x256x256`` float32, to feed back as
    ``SlicePrompt.mask_input``; stability: IoU of the mask thresholded at logit
    -1 and +1 (SAM's stability score; NaN when not computed).
    """

    mask: np.ndarray
    score: float
    low_res_logits: np.ndarray
    stability: float = float("nan")


@dataclass
class SliceResult:
    """One slice segmented from the prompts on it, on the whole volume grid.

    index: slice along ``axis`` (a numpy axis of the KJI array); mask: ``(K, J, I)`` bool
    on the volume grid, set on that slice only; score: the model's predicted IoU.
    """

    index: int
    axis: int
    mask: np.ndarray
    score: float


class SliceSegmenter(Protocol):
    """Anything that segments slice ``index`` (along a fixed axis of a volume)."""

    def segment_slice(self, index: int, prompt: SlicePrompt) -> Prediction:
        """Mask for slice ``index`` given the prompt (``index`` in ``0..n_slices-1``)."""
        ...

    @property
    def n_slices(self) -> int:
        """Number of slices along the segmenter's axis."""
        ...
