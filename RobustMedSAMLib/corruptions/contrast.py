"""Contrast change: a gamma curve over the robust intensity range.

A linear contrast or brightness change would be undone by the model's own
intensity normalisation, so the contrast corruption is non-linear. Same
conventions as ``noise.py``.
"""

from __future__ import annotations

import numpy as np


def gamma_contrast(
    unit: np.ndarray, gamma: float, rng: np.random.Generator, spacing: tuple[float, ...]
) -> np.ndarray:
    """``u ** gamma`` on ``[0, 1]`` (gamma > 1 darkens mid-tones and compresses the
    contrast of dark tissue); values outside ``[0, 1]`` keep their offset from the
    clipped value, so the range's ends stay where they were."""
    inside = np.clip(unit, 0, 1)
    return np.power(inside, np.float32(gamma)) + (unit - inside)
