"""Intensity bookkeeping shared by every corruption: the robust intensity range,
the unit scale the corruptions work in, and the way back to the input's dtype.

Corruptions work on ``u = (x - low) / (high - low)`` in float32, where ``low``
and ``high`` are the 0.5 and 99.5 percentiles of the whole input (a slice or a
volume): tissue lies in about ``[0, 1]`` whatever the modality or dtype, so one
parameter table serves int16 CT, uint8 and float MR alike. The mapping both ways is
computed in float64 (the width of a float32 range near +-3e38 overflows float32,
that of float64 values near +-1.8e308 overflows float64 and is halved), so finite
voxels stay finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from RobustMedSAMLib.errors import InputError

LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5
MAX_PERCENTILE_SAMPLES = 1_000_003
"""Percentiles of larger images are taken on a regular subsample of this many voxels."""
UNIT_BOUND = 1e30
"""Unit-scale values are clipped to +-this: a float32 filter sum over up to 1e8 pixels
of them stays finite. A voxel that far out (1e30 range widths from the tissue) is
written back unchanged by ``corrupt``."""
CHUNK_VOXELS = 1 << 22
"""Voxels converted at a time (float64 temporaries stay at 32 MB)."""


@dataclass(frozen=True)
class IntensityRange:
    """``low``..``high`` in the image's own units (HU, raw MR signal, grey levels)."""

    low: float
    high: float

    @property
    def width(self) -> float:
        return self.high - self.low

    @property
    def factor(self) -> float:
        """1, or 0.5 when ``high - low`` overflows float64: the mapping is done on x * factor."""
        return 1.0 if np.isfinite(self.high - self.low) else 0.5


def robust_range(image: np.ndarray) -> IntensityRange:
    """The 0.5..99.5 percentile range of ``image`` (any shape).

    Falls back to min..max when the percentiles coincide (a mostly constant
    image), and to a width of 1 intensity unit for a constant image, so that the
    width is never zero.
    """
    flat = image.reshape(-1)
    step = max(1, flat.size // MAX_PERCENTILE_SAMPLES)
    sample = flat[::step].astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        low, high = np.percentile(sample, [LOW_PERCENTILE, HIGH_PERCENTILE])
    if not (np.isfinite(low) and np.isfinite(high)):  # interpolation overflowed near 1.8e308
        low, high = np.percentile(sample, [LOW_PERCENTILE, HIGH_PERCENTILE], method="nearest")
    if high <= low:
        low, high = flat.min(), flat.max()
    if high <= low:
        high = low + 1.0
    return IntensityRange(float(low), float(high))


def check_image(image: np.ndarray) -> None:
    """Raise InputError unless ``image`` is a 2D or 3D real, finite array."""
    if image.ndim not in (2, 3):
        raise InputError(
            f"image has shape {image.shape}: give a 2D slice (rows, cols) "
            "or a 3D volume (slices, rows, cols)"
        )
    if image.dtype == bool or not (
        np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)
    ):
        raise InputError(
            f"image dtype {image.dtype} is not supported: give integer or float voxels"
        )
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise InputError("image contains NaN or infinite values: replace them before corrupting")


def _frame(scale: IntensityRange) -> tuple[float, float, float]:
    """``(factor, low * factor, width * factor)``: all finite in float64."""
    factor = scale.factor
    low = scale.low * factor
    return factor, low, scale.high * factor - low


def to_unit(image: np.ndarray, scale: IntensityRange) -> np.ndarray:
    """``image`` mapped to float32 unit scale: ``low`` -> 0, ``high`` -> 1 (float64
    arithmetic, clipped to +-UNIT_BOUND)."""
    factor, low, width = _frame(scale)
    flat = image.reshape(-1)
    unit = np.empty(flat.shape, np.float32)
    for start in range(0, flat.size, CHUNK_VOXELS):
        values = flat[start : start + CHUNK_VOXELS].astype(np.float64)
        values *= factor
        values -= low
        values /= width
        np.clip(values, -UNIT_BOUND, UNIT_BOUND, out=values)
        unit[start : start + CHUNK_VOXELS] = values
    return unit.reshape(image.shape)


def from_unit(unit: np.ndarray, scale: IntensityRange, dtype: np.dtype) -> np.ndarray:
    """Unit-scale values back to ``dtype`` (float64 arithmetic; rounded and clipped to
    the dtype's range for integers, clipped to its finite range for floats)."""
    dtype = np.dtype(dtype)
    factor, low, width = _frame(scale)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        bottom, top = float(info.min), float(info.max)
        if int(top) > info.max:  # 64-bit maxima are not floats: take the next one down
            top = float(np.nextafter(top, 0.0))
    else:
        info = np.finfo(dtype)
        bottom, top = float(info.min), float(info.max)
    flat = unit.reshape(-1)
    out = np.empty(flat.shape, dtype)
    for start in range(0, flat.size, CHUNK_VOXELS):
        values = flat[start : start + CHUNK_VOXELS].astype(np.float64)
        with np.errstate(over="ignore"):  # an overflow is clipped to the dtype's range next
            values *= width
            values += low
        np.clip(values, bottom * factor, top * factor, out=values)
        values /= factor
        if np.issubdtype(dtype, np.integer):
            np.rint(values, out=values)
            np.clip(values, bottom, top, out=values)
        out[start : start + CHUNK_VOXELS] = values
    return out.reshape(unit.shape)
