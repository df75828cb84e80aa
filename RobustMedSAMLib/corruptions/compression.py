"""Lossy compression: baseline JPEG of every slice (Pillow).

Each slice is mapped to 8 bits over the robust range, compressed and decoded;
only the compression error (decoded minus the 8-bit original) is added to the
full-precision image, so the result shows JPEG's block and ringing artifacts
without 8-bit quantisation or clipping. Same conventions as ``noise.py``.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def _jpeg_roundtrip(grey: np.ndarray, quality: int) -> np.ndarray:
    """``grey`` (rows, cols) uint8 through JPEG at ``quality`` and back."""
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("L"))


def jpeg_compression(
    unit: np.ndarray, quality: float, rng: np.random.Generator, spacing: tuple[float, ...]
) -> np.ndarray:
    """JPEG artifacts at ``quality`` (1..95, lower is worse) in every slice."""
    grey = np.rint(np.clip(unit, 0, 1) * 255).astype(np.uint8)
    out = unit.copy()
    for index, slice_ in enumerate(grey):
        error = _jpeg_roundtrip(slice_, int(quality)).astype(np.float32) - slice_
        out[index] += error / np.float32(255)
    return out
