"""Noise corruptions: additive Gaussian, Rician (MR magnitude), Poisson (quantum,
X-ray and CT) and multiplicative speckle (ultrasound).

Every function takes a float32 unit-scale stack ``(slices, rows, cols)`` (see
``intensity.py``: 0 and 1 are the 0.5 and 99.5 percentiles of the input), a
level from the severity table, a seeded Generator and the spacing in mm along
the three axes; it returns a new float32 stack of the same shape. For a fixed
seed the random pattern is the same at every severity; only its strength grows.
"""

from __future__ import annotations

import numpy as np

POISSON_EXACT = 1e15
"""Mean counts above which a voxel keeps its mean (1/sqrt(1e15) = 3e-8 < float32 eps)."""


def _normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def gaussian_noise(
    unit: np.ndarray, sigma: float, rng: np.random.Generator, spacing: tuple[float, ...]
) -> np.ndarray:
    """Add white Gaussian noise of standard deviation ``sigma`` (unit scale)."""
    noise = _normal(rng, unit.shape)
    noise *= np.float32(sigma)
    return unit + noise


def rician_noise(
    unit: np.ndarray, sigma: float, rng: np.random.Generator, spacing: tuple[float, ...]
) -> np.ndarray:
    """MR magnitude noise: ``|u + sigma (n1 + i n2)|`` with white Gaussian ``n1, n2``.

    Bright tissue gets nearly Gaussian noise; dark background gets the Rayleigh
    floor that magnitude images show. Values below 0 (under the 0.5 percentile)
    are kept as they are and only the non-negative part is treated as magnitude.
    """
    positive = np.maximum(unit, 0)
    real = _normal(rng, unit.shape)
    real *= np.float32(sigma)
    real += positive
    imaginary = _normal(rng, unit.shape)
    imaginary *= np.float32(sigma)
    return np.hypot(real, imaginary) + (unit - positive)


def poisson_noise(
    unit: np.ndarray, photons: float, rng: np.random.Generator, spacing: tuple[float, ...]
) -> np.ndarray:
    """Quantum noise: ``Poisson(photons * u) / photons`` for ``u >= 0``.

    ``photons`` is the expected count at the top of the range (u = 1), so the
    noise there has a relative standard deviation of ``1 / sqrt(photons)`` and
    falls with the signal. An image-domain approximation: a CT scanner counts
    photons in the projections, not in the reconstructed voxels.
    """
    positive = np.maximum(unit, 0)
    expected = positive.astype(np.float64) * photons
    # numpy refuses means past ~1e18; past POISSON_EXACT the relative noise is under
    # float32 resolution anyway, so the count is its mean
    exact = expected > POISSON_EXACT
    counts = rng.poisson(np.where(exact, 0.0, expected))
    noisy = np.where(exact, expected, counts).astype(np.float32)
    noisy /= np.float32(photons)
    return noisy + (unit - positive)


def speckle_noise(
    unit: np.ndarray, sigma: float, rng: np.random.Generator, spacing: tuple[float, ...]
) -> np.ndarray:
    """Multiplicative speckle: ``u * (1 + sigma n)`` with white Gaussian ``n``.

    Noise proportional to the signal, as in ultrasound; ``sigma`` is its
    relative standard deviation.
    """
    noise = _normal(rng, unit.shape)
    noise *= np.float32(sigma)
    noise += np.float32(1)
    return unit * noise
