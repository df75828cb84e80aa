"""Interactive 2D evaluation, MedicoSAM's protocol.

A first prompt from the truth (one positive point at the object's interior maximum,
or its box), then up to ``n_corrections`` clicks, each in the largest error region
(see ``prompts.correction_point``), with all points so far and the previous mask's
low-res logits fed back. Dice and IoU after every step. Prompts are answered as the
product answers them: a first point alone, to a model trained with boxes only
(LiteMedSAM, robustmedsam-lite), goes through the point search
(``point_search.answer_points``), and the corrections after it go with the box found
there, as the Slicer session's clicks and ``segment`` do.

Frame: slice pixels; images and masks are ``(rows, cols)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from scipy import ndimage

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.evaluation.metrics import dice, iou
from RobustMedSAMLib.evaluation.simulated_clicks import (
    correction_point,
)
from RobustMedSAMLib.inference.mask_prompts import deepest_point, mask_box
from RobustMedSAMLib.inference.point_search import answer_points
from RobustMedSAMLib.inference.preprocessing import auto_window, window_to_unit
from RobustMedSAMLib.inference.types import Prediction, SlicePrompt
from RobustMedSAMLib.names import FIRST_PROMPTS


class SlicePredictor(Protocol):
    """What the protocols need of a model: ``Predictor`` (or a test double)."""

    def encode(self, image: np.ndarray, window: tuple[float, float] | None = None): ...

    def set_encoded(self, encoded) -> None: ...

    def predict(self, prompt: SlicePrompt) -> Prediction: ...

    def candidates(self, prompt: SlicePrompt, multimask: bool = True) -> list[Prediction]: ...


@dataclass
class InteractiveResult:
    """``dice[s]``, ``iou[s]`` after step ``s`` (0 = first prompt, then one per
    correction; always ``n_corrections + 1`` long: once the mask is perfect the
    last value is carried on). ``clicks``: ``(x, y, label)`` of each correction."""

    dice: list[float]
    iou: list[float]
    clicks: list[tuple[float, float, int]] = field(default_factory=list)


def _answerer(
    predictor: SlicePredictor, image: np.ndarray, window: tuple[float, float] | None
) -> Callable[[SlicePrompt], Prediction]:
    """What the product answers to a prompt on this slice: points alone, to a model
    trained without points (``Predictor.prompts``), go through the point search on the
    first prompt, and the corrections after it go with the box found there and the
    previous mask, as the Slicer session's clicks and ``segment`` do
    (``point_search.answer_points``); any other prompt goes to the model."""
    if "point" in getattr(predictor, "prompts", ("point",)):
        return predictor.predict
    unit = window_to_unit(image, window or auto_window(image))
    found: list[np.ndarray] = []  # the first search's box

    def answer(prompt: SlicePrompt) -> Prediction:
        if prompt.box is not None or not len(prompt.points):
            return predictor.predict(prompt)
        if found:
            return predictor.predict(
                SlicePrompt(prompt.points, prompt.labels, found[0], prompt.mask_input)
            )
        points = SlicePrompt(prompt.points, prompt.labels)
        candidates = predictor.candidates
        prediction, box = answer_points(candidates, predictor.predict, points, unit, False)
        found.extend([] if box is None else [box])
        return prediction

    return answer


def first_prompt(truth: np.ndarray, kind: str, jitter: float = 0.0, seed: int = 0) -> SlicePrompt:
    """The protocol's first prompt from a non-empty ``(rows, cols)`` truth mask.

    ``jitter`` 0: the tight box of the truth, or its deepest pixel. ``jitter`` > 0 imitates
    a user, drawn from ``seed``: each box side moves in or out by up to ``jitter`` x the
    box's width (x0, x1) or height (y0, y1), whole pixels, kept on the slice and at
    least one pixel wide; the point is a random pixel of the truth's core (distance to
    its edge at least half the deepest pixel's).
    """
    if kind not in FIRST_PROMPTS:
        raise InputError(f"unknown first prompt {kind!r}: use one of {FIRST_PROMPTS}")
    if jitter < 0:
        raise InputError(f"prompt jitter {jitter} must be >= 0")
    rng = np.random.default_rng(seed) if jitter > 0 else None
    if kind == "point":
        point = deepest_point(truth) if rng is None else _core_point(truth, rng)
        return SlicePrompt(points=[point], labels=[1])
    box = mask_box(truth)
    if rng is not None:
        box = _jitter_box(box, jitter, truth.shape, rng)
    return SlicePrompt(box=tuple(float(v) for v in box))


def _jitter_box(
    box: np.ndarray, jitter: float, shape: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """``(x0, y0, x1, y1)`` inclusive pixels, each side moved by a whole-pixel uniform
    offset in ``[-jitter, jitter]`` x the box's extent on its axis, then clipped."""
    x0, y0, x1, y1 = (float(v) for v in box)
    sides = np.array([x1 - x0 + 1, y1 - y0 + 1, x1 - x0 + 1, y1 - y0 + 1])
    moved = box + np.rint(rng.uniform(-jitter, jitter, 4) * sides)
    height, width = shape
    nx0, nx1 = np.clip(moved[[0, 2]], 0, width - 1)
    ny0, ny1 = np.clip(moved[[1, 3]], 0, height - 1)
    nx0, nx1 = min(nx0, nx1), max(nx0, nx1)
    ny0, ny1 = min(ny0, ny1), max(ny0, ny1)
    return np.array((nx0, ny0, nx1, ny1), np.float32)


def _core_point(truth: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """A uniformly drawn pixel ``(x, y)`` of the truth whose distance to the truth's
    edge (or the slice's) is at least half the largest such distance."""
    depth = ndimage.distance_transform_edt(np.pad(np.asarray(truth, bool), 1))[1:-1, 1:-1]
    rows, cols = np.nonzero(depth >= depth.max() / 2)
    pick = int(rng.integers(len(rows)))
    return float(cols[pick]), float(rows[pick])


def evaluate_interactive(
    predictor: SlicePredictor,
    image: np.ndarray,
    truth: np.ndarray,
    first: str = "point",
    n_corrections: int = 7,
    window: tuple[float, float] | None = None,
    encoded: object | None = None,
    jitter: float = 0.0,
    seed: int = 0,
) -> InteractiveResult:
    """Run the click protocol on one slice ``image`` ``(rows, cols)`` against ``truth``
    (same shape, non-empty). The encoder runs once (not at all when ``encoded``, the
    predictor's ``encode`` result for this image and window, is given); each step
    costs a decoder call. ``jitter``, ``seed``: the first prompt's (``first_prompt``)."""
    truth = np.asarray(truth, bool)
    if np.shape(image) != truth.shape:
        raise InputError(f"image {np.shape(image)} and mask {truth.shape} differ in shape")
    if n_corrections < 0:
        raise InputError(f"n_corrections={n_corrections} must be >= 0")
    prompt = first_prompt(truth, first, jitter, seed)
    if encoded is None:
        encoded = predictor.encode(np.asarray(image), window)
    predictor.set_encoded(encoded)
    answer = _answerer(predictor, np.asarray(image), window)
    prediction = answer(prompt)
    result = InteractiveResult([dice(prediction.mask, truth)], [iou(prediction.mask, truth)])
    points, labels = list(map(tuple, prompt.points)), list(prompt.labels)
    for _ in range(n_corrections):
        click = correction_point(prediction.mask, truth)
        if click is None:
            result.dice.append(result.dice[-1])
            result.iou.append(result.iou[-1])
            continue
        points.append((click.x, click.y))
        labels.append(click.label)
        result.clicks.append((click.x, click.y, click.label))
        prompt = SlicePrompt(points, labels, prompt.box, prediction.low_res_logits)
        prediction = answer(prompt)
        result.dice.append(dice(prediction.mask, truth))
        result.iou.append(iou(prediction.mask, truth))
    return result
