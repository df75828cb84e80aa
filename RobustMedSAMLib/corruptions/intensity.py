"""Intensity bookkeeping shared by every corruption: the robust intensity range,
the unit scale the corruptions work in, and the way back to the input's dtype.

Corruptions work on ``u = (x - low) / (high - low)`` in float32, where ``low``
and ``high`` are the 0.5 and 99.5 percentiles of the whole input (a slice or a
volume): tissue lies in about ``[0, 1]`` whatever the modality or dtype, so one
parameter table serves int16 CT, uint8 and float MR alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from RobustMedSAMLib.errors import InputError

LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5
MAX_PERCENTILE_SAMPLES = 1_000_003
"""Percentiles of larger images are taken on a regular subsample of this many voxels."""


@dataclass(frozen=True)
class IntensityRange:
    """``low``..``high`` in the image's own units (HU, raw MR signal, grey levels)."""

    low: float
    high: float

    @property
    def width(self) -> float:
        return self.high - self.low


def robust_range(image: np.ndarray) -> IntensityRange:
    """The 0.5..99.5 percentile range of ``image`` (any shape).

    Falls back to min..max when the percentiles coincide (a mostly constant
    image), and to a width of 1 intensity unit for a constant image, so that the
    width is never zero.
    """
    flat = image.reshape(-1)
    step = max(1, flat.size // MAX_PERCENTILE_SAMPLES)
    low, high = np.percentile(flat[::step], [LOW_PERCENTILE, HIGH_PERCENTILE])
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


def to_unit(image: np.ndarray, scale: IntensityRange) -> np.ndarray:
    """``image`` mapped to float32 unit scale: ``low`` -> 0, ``high`` -> 1."""
    unit = image.astype(np.float32)
    unit -= np.float32(scale.low)
    unit /= np.float32(scale.width)
    return unit


def from_unit(unit: np.ndarray, scale: IntensityRange, dtype: np.dtype) -> np.ndarray:
    """Unit-scale values back to ``dtype`` (rounded and clipped for integers)."""
    dtype = np.dtype(dtype)
    exact_in_float32 = dtype.itemsize <= 2 or dtype == np.float32
    values = unit.astype(np.float32 if exact_in_float32 else np.float64)
    values *= scale.width
    values += scale.low
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        top = values.dtype.type(info.max)
        if int(top) > info.max:  # 64-bit maxima are not floats: take the next one down
            top = np.nextafter(top, values.dtype.type(0))
        np.rint(values, out=values)
        np.clip(values, info.min, top, out=values)
    else:
        info = np.finfo(dtype)
        np.clip(values, info.min, info.max, out=values)
    return values.astype(dtype)
