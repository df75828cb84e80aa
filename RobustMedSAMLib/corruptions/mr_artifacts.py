"""MR acquisition artifacts, simulated from their physics with numpy: motion
ghosting (periodic motion during phase encoding), k-space spikes (herringbone)
and intensity inhomogeneity (bias field).

Same conventions as ``noise.py``: float32 unit-scale stacks ``(slices, rows,
cols)``, spacing in mm along those three axes. The phase-encoding direction is
the row axis (up-down in the slice). Ghosting and spikes act on the magnitude of
the non-negative part of the image; values below 0 (under the 0.5 percentile)
are carried over unchanged.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from RobustMedSAMLib.corruptions.blur import SLICES_PER_CHUNK

GHOST_PERIOD_LINES = (6.0, 16.0)
"""Range of the motion period, in phase-encoding lines (breathing over a few TRs)."""
SPIKE_RADIUS = (0.15, 0.45)
"""Range of the spike's distance from the k-space centre, as a fraction of Nyquist."""
BIAS_DEGREE = 3
"""Degree of the polynomial whose exponential is the bias field."""


def motion_ghosting(
    unit: np.ndarray, amplitude_mm: float, rng: np.random.Generator, spacing: tuple[float, ...]
) -> np.ndarray:
    """Periodic motion along the phase-encoding (row) axis during acquisition.

    Line ``ky`` of k-space, acquired at time ``t = ky + rows/2`` (sequential
    order), sees the object shifted by ``d(t) = amplitude * sin(2 pi t / P + phi)``;
    the shift becomes the phase ``exp(-2 pi i ky d / rows)``. The result is the
    magnitude image, with ghosts repeating every ``rows / P`` pixels. ``P`` and
    ``phi`` are drawn from ``rng`` (one motion for the whole stack).
    """
    rows = unit.shape[1]
    period = rng.uniform(*GHOST_PERIOD_LINES)
    phase0 = rng.uniform(0.0, 2 * math.pi)
    ky = np.fft.fftfreq(rows, d=1.0 / rows)  # integer line index, DC first
    shift = (amplitude_mm / spacing[1]) * np.sin(2 * math.pi * (ky + rows // 2) / period + phase0)
    modulation = np.exp(-2j * math.pi * ky * shift / rows).astype(np.complex64)
    out = np.empty_like(unit)
    for start in range(0, unit.shape[0], SLICES_PER_CHUNK):
        chunk = unit[start : start + SLICES_PER_CHUNK]
        positive = np.maximum(chunk, 0)
        kspace = np.fft.fft(positive, axis=1)
        kspace *= modulation[None, :, None]
        out[start : start + SLICES_PER_CHUNK] = np.abs(np.fft.ifft(kspace, axis=1)) + (
            chunk - positive
        )
    return out


def kspace_spike(
    unit: np.ndarray, amplitude: float, rng: np.random.Generator, spacing: tuple[float, ...]
) -> np.ndarray:
    """One bright k-space sample per slice: the herringbone stripe pattern.

    A spike at spatial frequency ``k`` adds ``amplitude * exp(i (2 pi k.x + phi))``
    to the complex image; the magnitude then shows stripes of relative depth
    ``amplitude`` over tissue and a floor of ``amplitude`` over the background.
    ``k`` (direction and distance from the centre) and ``phi`` are drawn per slice.
    """
    rows, cols = unit.shape[1:]
    out = np.empty_like(unit)
    y = np.arange(rows, dtype=np.float64)[:, None]
    x = np.arange(cols, dtype=np.float64)[None, :]
    for index, slice_ in enumerate(unit):
        radius = rng.uniform(*SPIKE_RADIUS) * 0.5  # cycles per pixel
        direction = rng.uniform(0.0, 2 * math.pi)
        phase = rng.uniform(0.0, 2 * math.pi)
        angle = 2 * math.pi * radius * (math.sin(direction) * y + math.cos(direction) * x) + phase
        stripes = np.cos(angle).astype(np.float32)
        positive = np.maximum(slice_, 0)
        magnitude_sq = positive * positive + np.float32(2 * amplitude) * positive * stripes
        magnitude_sq += np.float32(amplitude * amplitude)
        out[index] = np.sqrt(np.maximum(magnitude_sq, 0)) + (slice_ - positive)
    return out


def _normalised_coordinates(shape: tuple[int, ...], spacing: tuple[float, ...]) -> list:
    """Per-axis coordinates in mm from the centre, divided by the largest half
    extent (so the field is isotropic in the patient), shaped for broadcasting."""
    extents = [n * s for n, s in zip(shape, spacing, strict=True)]
    half = max(max(extents) / 2, 1e-6)
    coordinates = []
    for axis, (n, s) in enumerate(zip(shape, spacing, strict=True)):
        values = ((np.arange(n) + 0.5) * s - n * s / 2) / half
        view = [1] * len(shape)
        view[axis] = n
        coordinates.append(values.astype(np.float32).reshape(view))
    return coordinates


def bias_field(
    unit: np.ndarray, strength: float, rng: np.random.Generator, spacing: tuple[float, ...]
) -> np.ndarray:
    """Smooth multiplicative intensity inhomogeneity: ``u * exp(strength * p)``.

    ``p`` is a random polynomial of degree 3 in the patient coordinates (across
    slices too), scaled so that ``max |p| = 1`` over the image: the field
    spans at most ``exp(-strength)..exp(strength)``.
    """
    degree = BIAS_DEGREE
    coefficients = np.zeros((degree + 1,) * 3)
    for i, j, k in itertools.product(range(degree + 1), repeat=3):
        if 0 < i + j + k <= degree:
            coefficients[i, j, k] = rng.uniform(-1.0, 1.0)
    z, y, x = (c.ravel() for c in _normalised_coordinates(unit.shape, spacing))
    powers = [np.stack([axis**n for n in range(degree + 1)]) for axis in (z, y, x)]
    # p(z, y, x) = sum_i z^i * plane_i(y, x): the 3D sum has only degree + 1 terms
    planes = np.einsum("ijk,jy,kx->iyx", coefficients, powers[1], powers[2])
    log_field = np.zeros(unit.shape, np.float32)
    for i in range(degree + 1):
        log_field += (powers[0][i][:, None, None] * planes[i]).astype(np.float32)
    peak = float(np.abs(log_field).max())
    if peak > 0:
        log_field *= np.float32(strength / peak)
    positive = np.maximum(unit, 0)
    return positive * np.exp(log_field) + (unit - positive)
