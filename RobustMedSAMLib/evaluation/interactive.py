"""Interactive 2D evaluation, MedicoSAM's protocol.

A first prompt from the truth (one positive point at the object's interior maximum,
or its box), then up to ``n_corrections`` clicks, each in the largest error region
(see ``prompts.correction_point``), with all points so far and the previous mask's
low-res logits fed back. Dice and IoU after every step.

Frame: slice pixels; images and masks are ``(rows, cols)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.evaluation.metrics import dice, iou
from RobustMedSAMLib.evaluation.simulated_clicks import (
    correction_point,
)
from RobustMedSAMLib.inference.mask_prompts import deepest_point, mask_box
from RobustMedSAMLib.inference.types import Prediction, SlicePrompt
from RobustMedSAMLib.names import FIRST_PROMPTS


class SlicePredictor(Protocol):
    """What the protocols need of a model: ``Predictor`` (or a test double)."""

    def encode(self, image: np.ndarray, window: tuple[float, float] | None = None): ...

    def set_encoded(self, encoded) -> None: ...

    def predict(self, prompt: SlicePrompt) -> Prediction: ...


@dataclass
class InteractiveResult:
    """``dice[s]``, ``iou[s]`` after step ``s`` (0 = first prompt, then one per
    correction; always ``n_corrections + 1`` long: once the mask is perfect the
    last value is carried on). ``clicks``: ``(x, y, label)`` of each correction."""

    dice: list[float]
    iou: list[float]
    clicks: list[tuple[float, float, int]] = field(default_factory=list)


def first_prompt(truth: np.ndarray, kind: str) -> SlicePrompt:
    """The protocol's first prompt from a non-empty ``(rows, cols)`` truth mask."""
    if kind == "point":
        return SlicePrompt(points=[deepest_point(truth)], labels=[1])
    if kind == "box":
        return SlicePrompt(box=tuple(float(v) for v in mask_box(truth)))
    raise InputError(f"unknown first prompt {kind!r}: use one of {FIRST_PROMPTS}")


def evaluate_interactive(
    predictor: SlicePredictor,
    image: np.ndarray,
    truth: np.ndarray,
    first: str = "point",
    n_corrections: int = 7,
    window: tuple[float, float] | None = None,
    encoded: object | None = None,
) -> InteractiveResult:
    """Run the click protocol on one slice ``image`` ``(rows, cols)`` against ``truth``
    (same shape, non-empty). The encoder runs once (not at all when ``encoded``, the
    predictor's ``encode`` result for this image and window, is given); each step
    costs a decoder call."""
    truth = np.asarray(truth, bool)
    if np.shape(image) != truth.shape:
        raise InputError(f"image {np.shape(image)} and mask {truth.shape} differ in shape")
    if n_corrections < 0:
        raise InputError(f"n_corrections={n_corrections} must be >= 0")
    prompt = first_prompt(truth, first)
    if encoded is None:
        encoded = predictor.encode(np.asarray(image), window)
    predictor.set_encoded(encoded)
    prediction = predictor.predict(prompt)
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
        prediction = predictor.predict(prompt)
        result.dice.append(dice(prediction.mask, truth))
        result.iou.append(iou(prediction.mask, truth))
    return result
