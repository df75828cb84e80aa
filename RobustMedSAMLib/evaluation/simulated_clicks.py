"""Correction clicks derived from a true mask, as an evaluation protocol simulates a
user (the first prompt's box and point come from ``inference.mask_prompts``).

Frame: slice pixels. Masks are ``(rows, cols)`` bool; a point is ``(x, y) =
(col, row)``; a box is ``(x0, y0, x1, y1)`` with inclusive corners.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.inference.mask_prompts import deepest_point


@dataclass(frozen=True)
class Correction:
    """A simulated click: ``(x, y)`` slice pixels; positive (1) in a miss, negative (0)
    in a false positive; ``area`` of the error region it was placed in (pixels)."""

    x: float
    y: float
    label: int
    area: int


def correction_point(prediction: np.ndarray, truth: np.ndarray) -> Correction | None:
    """MedicoSAM's correction rule: the largest connected error region (a miss,
    ``truth & ~prediction``, or a false positive, ``prediction & ~truth``), clicked at
    its interior maximum. None when the prediction equals the truth. Ties in area
    go to misses, then to the region met first in row-major order."""
    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    if prediction.shape != truth.shape:
        raise InputError(f"mask shapes differ: {prediction.shape} vs {truth.shape}")
    best: tuple[int, int, np.ndarray] | None = None
    for label, errors in ((1, truth & ~prediction), (0, prediction & ~truth)):
        regions, count = ndimage.label(errors)
        if count == 0:
            continue
        areas = np.bincount(regions.ravel())[1:]
        largest = int(np.argmax(areas))
        if best is None or areas[largest] > best[0]:
            best = (int(areas[largest]), label, regions == largest + 1)
    if best is None:
        return None
    area, label, region = best
    x, y = deepest_point(region)
    return Correction(x, y, label, area)
