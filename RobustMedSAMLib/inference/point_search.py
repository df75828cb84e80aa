"""One point, made as good as it can be: a search over candidate masks.

A point alone is ambiguous (SAM answers with three candidates), and a model trained
with boxes only (LiteMedSAM: ``ModelSource.prompts`` in the registry) answers a point
with noise. So from the points on one slice the search asks the model for:

- its multimask output from the points (only when the model was trained with points),
- a box of each side in ``BOX_SIDES`` (fractions of the slice's longest side, which
  the model's input holds) centred on the first positive point (the points go with the
  box when the model takes points),

and keeps the candidate that holds every positive point and no negative one, does not
fill its box (a box smaller than the structure: the mask runs into all of its sides),
differs from its surroundings (its mean intensity and that of a ring around it differ
by ``MIN_CONTRAST`` of the window at least: a blob the model drew inside uniform
tissue does not), and scores best by predicted IoU x stability x *consistency*: the
IoU of the mask with the model's answer to the mask's own box (+10 %). A mask of a
real structure is a fixed point of "box it, ask again"; a blob the model drew in a box
that cuts through a structure or holds only background is not. Measured on phantoms:
``Testing/benchmarks/bench_point_search.py``.

Frame: slice pixels; points ``(x, y) = (col, row)``; boxes ``(x0, y0, x1, y1)`` inclusive.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from RobustMedSAMLib.inference.mask_prompts import intensity_contrast, mask_box
from RobustMedSAMLib.inference.propagation import MIN_CONTRAST
from RobustMedSAMLib.inference.types import Prediction, SlicePrompt

BOX_SIDES = (1 / 32, 3 / 64, 1 / 16, 3 / 32, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2)
"""Box sides tried around a point, as fractions of the slice's longest side (8 to 128
pixels at a 256-pixel model input: two patches to half the input)."""
CONSISTENCY_EXTENSION = 0.1  # the mask's box is grown by this before asking again
ANSWER_EXTENSION = 0.1  # the chosen mask's box, grown by this, is the prompt answered
FILL_SIDES = 4  # a mask touching this many sides of its box prompt fills the box


@dataclass
class Candidate:
    """One candidate mask: where it came from and how it was judged.

    source: ``"multimask N"`` or ``"box S"`` (S: side in slice pixels); score: predicted
    IoU; stability: SAM's stability score; consistency: IoU with the answer to its own
    box; holds_points: holds every positive point and no negative one; fills_box:
    touches every side of its box prompt; rank: the product used to choose (-1: not
    eligible).
    """

    source: str
    score: float
    stability: float
    consistency: float
    area: int
    holds_points: bool
    fills_box: bool
    contrast: float = 0.0
    rank: float = -1.0

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "score": round(self.score, 4),
            "stability": round(self.stability, 4),
            "consistency": round(self.consistency, 4),
            "area": self.area,
            "holds_points": self.holds_points,
            "fills_box": self.fills_box,
            "contrast": round(self.contrast, 4),
            "rank": round(self.rank, 4),
        }


@dataclass
class PointChoice:
    """The chosen candidate's prediction, all candidates (judged, and the model's
    answers in the same order) and the chosen one's index."""

    prediction: Prediction
    candidates: list[Candidate]
    chosen: int
    answers: list[Prediction]


Segment = Callable[[SlicePrompt, bool], list[Prediction]]
"""``segment(prompt, multimask)`` -> the model's candidates for the current slice."""


def search_point(
    segment: Segment,
    prompt: SlicePrompt,
    image: np.ndarray,
    takes_points: bool,
) -> PointChoice:
    """The best candidate mask for the points of ``prompt`` on a slice; ``image``: the
    slice as the model sees it, ``(rows, cols)`` float, window mapped to 0..1.

    ``takes_points``: whether the model was trained with point prompts (its multimask
    output, and the points with each box, are tried only then).
    """
    positive = prompt.points[prompt.labels == 1]
    centre = positive[0] if len(positive) else prompt.points[0]
    slice_shape = image.shape
    longest = max(slice_shape)
    tries: list[tuple[str, SlicePrompt, bool]] = []
    if takes_points:
        tries.append(("multimask", SlicePrompt(prompt.points, prompt.labels), True))
    points = prompt if takes_points else SlicePrompt()
    for fraction in BOX_SIDES:
        side = fraction * longest
        box = _centred_box(centre, side, slice_shape)
        tries.append((f"box {side:.0f}", SlicePrompt(points.points, points.labels, box), False))
    predictions: list[tuple[str, Prediction, np.ndarray | None]] = []
    for name, tried, multimask in tries:
        answers = segment(tried, multimask)
        for n, answer in enumerate(answers):
            label = f"{name} {n}" if multimask else name
            predictions.append((label, answer, tried.box))
    candidates = [
        _judge(segment, name, answer, box, prompt, takes_points, image)
        for name, answer, box in predictions
    ]
    chosen = int(np.argmax([c.rank for c in candidates]))
    return PointChoice(predictions[chosen][1], candidates, chosen, [p[1] for p in predictions])


def answer_points(
    segment: Segment,
    predict: Callable[[SlicePrompt], Prediction],
    prompt: SlicePrompt,
    image: np.ndarray,
    takes_points: bool,
) -> tuple[Prediction, np.ndarray | None]:
    """The answer a user gets for the points of ``prompt`` on a slice (the session's
    clicks, the 2D evaluation): ``predict`` of the chosen candidate's box grown by
    ``ANSWER_EXTENSION`` (with the points when the model takes points), and that box;
    ``predict`` of the points as they are and None when no candidate holds them.
    ``segment``, ``image``, ``takes_points``: as for :func:`search_point`; ``predict``:
    the model's one answer to a prompt."""
    choice = search_point(segment, prompt, image, takes_points)
    if choice.candidates[choice.chosen].rank < 0:
        return predict(prompt), None
    box = mask_box(choice.prediction.mask, ANSWER_EXTENSION)
    points = prompt if takes_points else SlicePrompt()
    return predict(SlicePrompt(points.points, points.labels, box)), box


def _centred_box(centre: np.ndarray, side: float, shape: tuple[int, int]) -> np.ndarray:
    """A ``side``-pixel box around ``centre`` ``(x, y)``, clipped to the slice."""
    half = side / 2
    rows, cols = shape
    x0, y0 = max(centre[0] - half, 0.0), max(centre[1] - half, 0.0)
    x1, y1 = min(centre[0] + half, cols - 1.0), min(centre[1] + half, rows - 1.0)
    return np.array([x0, y0, x1, y1], np.float32)


def _judge(
    segment: Segment,
    name: str,
    answer: Prediction,
    box: np.ndarray | None,
    prompt: SlicePrompt,
    takes_points: bool,
    image: np.ndarray,
) -> Candidate:
    mask = np.asarray(answer.mask, bool)
    area = int(mask.sum())
    holds = bool(area) and _holds(mask, prompt)
    fills = box is not None and area > 0 and _touches(mask, box) >= FILL_SIDES
    consistency = 0.0
    if area:
        again = mask_box(mask, CONSISTENCY_EXTENSION)
        points = prompt if takes_points else SlicePrompt()
        redo = segment(SlicePrompt(points.points, points.labels, again), False)[0]
        consistency = _iou(mask, np.asarray(redo.mask, bool))
    candidate = Candidate(
        name, float(answer.score), float(answer.stability), consistency, area, holds, fills
    )
    if area:
        inside, ring = intensity_contrast(image, mask)
        candidate.contrast = abs(inside - ring)
    if holds and not fills and candidate.contrast >= MIN_CONTRAST:
        stability = answer.stability if np.isfinite(answer.stability) else 1.0
        candidate.rank = float(answer.score) * float(stability) * consistency
    return candidate


def _holds(mask: np.ndarray, prompt: SlicePrompt) -> bool:
    rows, cols = mask.shape
    for (x, y), label in zip(prompt.points, prompt.labels, strict=True):
        row = int(np.clip(round(float(y)), 0, rows - 1))
        col = int(np.clip(round(float(x)), 0, cols - 1))
        if bool(mask[row, col]) != bool(label):
            return False
    return True


def _touches(mask: np.ndarray, box: np.ndarray) -> int:
    """How many sides of ``box`` the mask's own box reaches (within 1 px)."""
    x0, y0, x1, y1 = mask_box(mask)
    bx0, by0, bx1, by1 = box
    return int(x0 <= bx0 + 1) + int(y0 <= by0 + 1) + int(x1 >= bx1 - 1) + int(y1 >= by1 - 1)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0
