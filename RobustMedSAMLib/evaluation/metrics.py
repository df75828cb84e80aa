"""Overlap metrics between a predicted and a true mask (any shape, bool or 0/1).

Convention: when both masks are empty the prediction is perfect (Dice = IoU = 1).
"""

from __future__ import annotations

import numpy as np

from RobustMedSAMLib.errors import InputError


def _pair(prediction: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    prediction, truth = np.asarray(prediction, bool), np.asarray(truth, bool)
    if prediction.shape != truth.shape:
        raise InputError(f"mask shapes differ: prediction {prediction.shape}, truth {truth.shape}")
    return prediction, truth


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """``2 |P & T| / (|P| + |T|)``; 1.0 when both are empty."""
    prediction, truth = _pair(prediction, truth)
    total = int(prediction.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def iou(prediction: np.ndarray, truth: np.ndarray) -> float:
    """``|P & T| / |P | T|``; 1.0 when both are empty."""
    prediction, truth = _pair(prediction, truth)
    union = int(np.logical_or(prediction, truth).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(prediction, truth).sum()) / union


def per_slice_dice(
    prediction: np.ndarray, truth: np.ndarray, axis: int = 0
) -> list[tuple[int, float]]:
    """``(slice index, Dice)`` along ``axis`` of two 3D masks, for every slice where
    the prediction or the truth is non-empty (slices empty in both are left out)."""
    prediction, truth = _pair(prediction, truth)
    if prediction.ndim != 3:
        raise InputError(f"per-slice Dice needs 3D masks, got shape {prediction.shape}")
    other = tuple(a for a in range(3) if a != axis)
    inter = np.logical_and(prediction, truth).sum(axis=other)
    sizes = prediction.sum(axis=other) + truth.sum(axis=other)
    return [(int(i), 2.0 * float(inter[i]) / float(sizes[i])) for i in np.flatnonzero(sizes)]


def mean_std(values: list[float] | np.ndarray) -> tuple[float, float]:
    """Mean and population standard deviation (0 for one value; NaN for none)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std())
