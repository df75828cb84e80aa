"""Prompts derived from a 2D mask: its box, points inside and outside it, and the
conversion between masks and the model's low-resolution logits.

Frame: ``(rows, cols)`` bool masks in slice pixels; points ``(x, y) = (col, row)``;
boxes ``(x0, y0, x1, y1)`` inclusive; low-res logits ``1 x L x L``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.inference.preprocessing import LONGEST_SIDE_STYLES, STYLES

LOW_RES = 256
_LOGIT_EPS = 1e-3


def mask_box(mask: np.ndarray, extension: float = 0.0, corners: str = "inclusive") -> np.ndarray:
    """Bounding box ``(x0, y0, x1, y1)`` (slice pixels, float32) of a non-empty 2D mask,
    each side moved out by ``extension`` x its width / height (at least 1 px if > 0),
    clipped to the slice. ``corners``: ``"inclusive"`` (the last pixel's index, as
    prompts take it) or ``"edges"`` (``x1``/``y1`` one past it: pixel-edge coordinates)."""
    mask = np.asarray(mask, bool)
    if mask.ndim != 2 or not mask.any():
        raise InputError("a bounding box needs a non-empty 2D mask")
    if corners not in ("inclusive", "edges"):
        raise InputError(f"corners must be 'inclusive' or 'edges', not {corners!r}")
    rows, cols = np.nonzero(mask)
    x0, x1, y0, y1 = cols.min(), cols.max(), rows.min(), rows.max()
    ex = math.ceil(extension * (x1 - x0 + 1)) if extension > 0 else 0
    ey = math.ceil(extension * (y1 - y0 + 1)) if extension > 0 else 0
    height, width = mask.shape
    box = np.array(
        (max(x0 - ex, 0), max(y0 - ey, 0), min(x1 + ex, width - 1), min(y1 + ey, height - 1)),
        np.float32,
    )
    if corners == "edges":
        box[2:] += 1
    return box


def deepest_point(mask: np.ndarray) -> tuple[float, float]:
    """The pixel deepest inside ``mask`` (largest distance to the background or the
    image edge), as ``(x, y)``; ties go to the first in row-major order."""
    mask = np.asarray(mask, bool)
    if mask.ndim != 2 or not mask.any():
        raise InputError("an interior point needs a non-empty 2D mask")
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return float(col), float(row)


def interior_points(mask: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` points ``(x, y)`` deep inside ``mask``: the deepest point of each
    component of at least a tenth of the largest's area (largest first), then
    farthest-point samples of the core (distance to the edge >= half its maximum)."""
    crop, (row0, col0) = _crop(mask, 1)
    depth = ndimage.distance_transform_edt(np.pad(crop, 1))[1:-1, 1:-1]
    components, count = ndimage.label(crop)
    index = np.arange(1, count + 1)
    areas = ndimage.sum_labels(crop, components, index)
    deepest = ndimage.maximum_position(depth, components, index)
    order = np.argsort(-areas, kind="stable")
    chosen = [deepest[i] for i in order if areas[i] >= 0.1 * areas[order[0]]][:n]
    core = np.argwhere(depth >= max(1.0, 0.5 * float(depth.max())))
    chosen_rc = _farthest_points(core, np.array(chosen, np.float64).reshape(-1, 2), n)
    return (chosen_rc[:, ::-1] + (col0, row0)).astype(np.float32)


def exterior_points(mask: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` points ``(x, y)`` spread around a ring outside ``mask`` at
    ``max(3, r / 4)`` px from it, ``r`` the radius of a disc of the mask's area."""
    if n == 0:
        return np.zeros((0, 2), np.float32)
    distance = max(3.0, 0.25 * math.sqrt(float(mask.sum()) / math.pi))
    crop, (row0, col0) = _crop(mask, math.ceil(distance) + 2)
    outside = ndimage.distance_transform_edt(~crop)
    ring = np.argwhere((outside >= distance) & (outside < distance + 1.5))
    if len(ring) == 0:
        return np.zeros((0, 2), np.float32)
    chosen_rc = _farthest_points(ring, ring[:1].astype(np.float64), n)
    return (chosen_rc[:, ::-1] + (col0, row0)).astype(np.float32)


def ring_around(mask: np.ndarray) -> np.ndarray:
    """The pixels 2 to ``2 + max(3, r / 3)`` px outside ``mask`` (``r``: radius of a disc
    of its area): what surrounds it, past the edge's partial-volume pixels."""
    mask = np.asarray(mask, bool)
    outside = ndimage.distance_transform_edt(~mask)
    width = max(3.0, math.sqrt(float(mask.sum()) / math.pi) / 3)
    return (outside >= 2) & (outside < 2 + width)


def intensity_contrast(
    image: np.ndarray, mask: np.ndarray, ring: np.ndarray | None = None
) -> tuple[float, float]:
    """``(mean inside, mean of the ring around)`` ``mask`` on ``image`` ``(rows, cols)``
    (the ring: :func:`ring_around`, or ``ring`` when the caller has it already; the
    slice's mean when the mask leaves no ring, as when it fills the slice)."""
    mask = np.asarray(mask, bool)
    image = np.asarray(image, np.float32)
    ring = ring_around(mask) if ring is None else ring
    inside = float(image[mask].mean()) if mask.any() else float(image.mean())
    around = float(image[ring].mean()) if ring.any() else float(image.mean())
    return inside, around


def mask_to_logits(mask: np.ndarray, style: str = "sam", size: int = LOW_RES) -> np.ndarray:
    """``(rows, cols)`` mask -> ``1 x size x size`` float32 logits (about ±6.9) in the
    model's low-res frame: ``"sam"`` and ``"litemedsam"`` scale the longest side to
    ``size`` and pad
    bottom/right with 0 (micro-sam found SAM needs 0 there); ``"medsam"``
    stretches the slice to ``size x size`` (see preprocessing.py)."""
    height, width = _low_res_size(mask.shape, style, size)
    zoom = (height / mask.shape[0], width / mask.shape[1])
    fraction = ndimage.zoom(mask.astype(np.float32), zoom, order=1, mode="nearest", grid_mode=True)
    fraction = np.clip(fraction, _LOGIT_EPS, 1 - _LOGIT_EPS)
    logits = np.zeros((1, size, size), np.float32)
    logits[0, :height, :width] = np.log(fraction / (1 - fraction))
    return logits


def logits_to_mask(logits: np.ndarray, shape: tuple[int, int], style: str = "sam") -> np.ndarray:
    """``1 x L x L`` low-res logits -> ``(rows, cols)`` bool mask (logit > 0); ``style``
    as in :func:`mask_to_logits`."""
    square = np.asarray(logits, np.float32)
    size = square.shape[-1]
    height, width = _low_res_size(shape, style, size)
    valid = square.reshape(size, size)[:height, :width]
    zoom = (shape[0] / height, shape[1] / width)
    return ndimage.zoom(valid, zoom, order=1, mode="nearest", grid_mode=True) > 0


def _farthest_points(candidates: np.ndarray, chosen: np.ndarray, n: int) -> np.ndarray:
    """Add to ``chosen`` (Mx2) candidates (Nx2) farthest from all chosen, up to ``n``."""
    if len(chosen) == 0:
        chosen = candidates[:1].astype(np.float64)
    points = list(chosen[:n])
    if len(points) >= n or len(candidates) == 0:
        return np.array(points, np.float64).reshape(-1, 2)
    nearest = np.min(((candidates[:, None, :] - chosen[None]) ** 2).sum(-1), axis=1)
    while len(points) < n:
        best = int(np.argmax(nearest))
        if nearest[best] == 0:
            break
        points.append(candidates[best].astype(np.float64))
        nearest = np.minimum(nearest, ((candidates - candidates[best]) ** 2).sum(-1))
    return np.array(points, np.float64).reshape(-1, 2)


def _crop(mask: np.ndarray, margin: int) -> tuple[np.ndarray, tuple[int, int]]:
    """``mask`` cut to its bounding box plus ``margin`` px, and the crop's (row, col)."""
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        raise InputError("cannot derive a prompt from an empty mask")
    r0, c0 = max(rows.min() - margin, 0), max(cols.min() - margin, 0)
    r1, c1 = rows.max() + margin + 1, cols.max() + margin + 1
    return np.asarray(mask[r0:r1, c0:c1], bool), (int(r0), int(c0))


def _low_res_size(shape: tuple[int, ...], style: str, size: int) -> tuple[int, int]:
    """Rows, cols a ``shape`` slice covers in the ``size x size`` low-res frame."""
    if style == "medsam":
        return size, size
    if style not in LONGEST_SIDE_STYLES:
        raise InputError(f"unknown low-res style {style!r}: use one of {STYLES}")
    scale = size / max(shape[0], shape[1])
    return int(shape[0] * scale + 0.5), int(shape[1] * scale + 0.5)
