"""Resolution losses, applied within each slice (rows, cols) so that a volume's
slice and the same slice corrupted alone degrade alike: Gaussian (defocus)
blur, in-plane motion blur and partial-volume down/up-sampling.

Same conventions as ``noise.py``: float32 unit-scale stacks ``(slices, rows,
cols)``, spacing in mm along those three axes. Kernels are built in millimetres
and sampled on the (possibly anisotropic) pixel grid; borders are mirrored.
A kernel's radius in pixels is bounded by the slice's size (a wider blur cannot
change the result much more: the slice is already averaged over its whole
extent), and the slices convolved at once by the memory available.
"""

from __future__ import annotations

import math
import os

import numpy as np

from RobustMedSAMLib.errors import InputError

SLICES_PER_CHUNK = 16
"""Slices convolved together at most: bounds the memory of the FFTs on large volumes."""
BYTES_PER_PADDED_PIXEL = 40
"""Peak bytes per padded pixel of one slice in ``convolve_slices``: float32 padding,
complex128 half spectrum (8 per pixel), float64 inverse, its crop and the transfer."""
FALLBACK_MEMORY = 4 << 30
"""Memory assumed available where the system does not say (bytes)."""


def available_memory() -> int:
    """Bytes of memory available now: MemAvailable on Linux, free pages elsewhere."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return FALLBACK_MEMORY


def slices_per_chunk(padded_shape: tuple[int, int], kernel_shape: tuple[int, ...]) -> int:
    """How many padded slices to convolve at once within half the available memory.

    Raises InputError when even one does not fit (a kernel far larger than the
    data usually means spacing in metres read as millimetres).
    """
    per_slice = BYTES_PER_PADDED_PIXEL * padded_shape[0] * padded_shape[1]
    budget = available_memory() // 2
    if per_slice > budget:
        raise InputError(
            f"a {kernel_shape[0]}x{kernel_shape[1]}-pixel blur kernel on a slice padded to "
            f"{padded_shape[0]}x{padded_shape[1]} needs {per_slice / 2**30:.1f} GiB, more than "
            f"the {budget / 2**30:.1f} GiB at hand: check the volume's spacing units or "
            "use a lower severity"
        )
    return int(max(1, min(SLICES_PER_CHUNK, budget // per_slice)))


def convolve_slices(stack: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve every slice of ``stack`` (S, R, C) with an odd-sized 2D ``kernel``.

    The slice is mirrored by the kernel's radius on each side, so the FFT's
    wrap-around never reaches the pixels kept (a radius up to the slice's size,
    as ``np.pad``'s symmetric mode allows). Returns float32 (S, R, C).
    """
    radius_r, radius_c = kernel.shape[0] // 2, kernel.shape[1] // 2
    rows, cols = stack.shape[1:]
    padded_shape = (rows + 2 * radius_r, cols + 2 * radius_c)
    chunk_slices = slices_per_chunk(padded_shape, kernel.shape)
    centred = np.zeros(padded_shape, np.float32)
    centred[: kernel.shape[0], : kernel.shape[1]] = kernel
    centred = np.roll(centred, (-radius_r, -radius_c), axis=(0, 1))
    transfer = np.fft.rfft2(centred)
    out = np.empty(stack.shape, np.float32)
    for start in range(0, stack.shape[0], chunk_slices):
        chunk = stack[start : start + chunk_slices]
        padded = np.pad(chunk, ((0, 0), (radius_r, radius_r), (radius_c, radius_c)), "symmetric")
        blurred = np.fft.irfft2(np.fft.rfft2(padded) * transfer, s=padded_shape)
        out[start : start + chunk_slices] = blurred[
            :, radius_r : radius_r + rows, radius_c : radius_c + cols
        ]
    return out


def gaussian_kernel(
    sigma_mm: float, spacing_rc: tuple[float, float], limit_rc: tuple[int, int] | None = None
) -> np.ndarray:
    """Normalised 2D Gaussian of ``sigma_mm`` on pixels of ``spacing_rc`` mm, radius
    3 sigma, or ``limit_rc`` pixels (the slice's rows, cols) when that is smaller."""
    axes = []
    for axis, pixel in enumerate(spacing_rc):
        sigma = sigma_mm / pixel
        radius = max(1, math.ceil(3 * sigma))
        if limit_rc is not None:
            radius = min(radius, max(1, limit_rc[axis]))
        offsets = np.arange(-radius, radius + 1, dtype=np.float64)
        weights = np.exp(-0.5 * (offsets / sigma) ** 2)
        axes.append(weights / weights.sum())
    return np.outer(axes[0], axes[1]).astype(np.float32)


def line_kernel(
    length_mm: float,
    angle: float,
    spacing_rc: tuple[float, float],
    limit_rc: tuple[int, int] | None = None,
) -> np.ndarray:
    """Normalised 2D kernel of a straight path ``length_mm`` long at ``angle`` (radians
    from the column axis towards the row axis), sampled with bilinear weights. With
    ``limit_rc`` (the slice's rows, cols) the path is shortened, in its direction,
    to fit within that many pixels each side of the centre."""
    half_r = 0.5 * length_mm * math.sin(angle) / spacing_rc[0]
    half_c = 0.5 * length_mm * math.cos(angle) / spacing_rc[1]
    if limit_rc is not None:
        pairs = zip(limit_rc, (half_r, half_c), strict=True)
        shrink = min([1.0, *(max(1, n) / abs(h) for n, h in pairs if h != 0)])
        half_r, half_c = half_r * shrink, half_c * shrink
    radius_r, radius_c = math.ceil(abs(half_r)) + 1, math.ceil(abs(half_c)) + 1
    kernel = np.zeros((2 * radius_r + 1, 2 * radius_c + 1), np.float64)
    samples = 8 * (math.ceil(max(abs(half_r), abs(half_c))) + 1)
    t = np.linspace(-1.0, 1.0, 2 * samples + 1)
    rows, cols = radius_r + t * half_r, radius_c + t * half_c
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    fr, fc = rows - r0, cols - c0
    for dr, dc, weight in (
        (0, 0, (1 - fr) * (1 - fc)),
        (0, 1, (1 - fr) * fc),
        (1, 0, fr * (1 - fc)),
        (1, 1, fr * fc),
    ):
        np.add.at(kernel, (r0 + dr, c0 + dc), weight)
    return (kernel / kernel.sum()).astype(np.float32)


def gaussian_blur(
    unit: np.ndarray, sigma_mm: float, rng: np.random.Generator, spacing: tuple[float, ...]
) -> np.ndarray:
    """Defocus-like blur: in-plane Gaussian of standard deviation ``sigma_mm``."""
    return convolve_slices(unit, gaussian_kernel(sigma_mm, spacing[1:], unit.shape[1:]))


def motion_blur(
    unit: np.ndarray, length_mm: float, rng: np.random.Generator, spacing: tuple[float, ...]
) -> np.ndarray:
    """In-plane linear motion blur over ``length_mm`` in a random direction
    (one direction for the whole stack, drawn from ``rng``)."""
    angle = rng.uniform(0.0, math.pi)
    return convolve_slices(unit, line_kernel(length_mm, angle, spacing[1:], unit.shape[1:]))


def _lerp_along(array: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``array`` at fractional ``positions`` along ``axis``
    (index units, clamped to the ends)."""
    size = array.shape[axis]
    positions = np.clip(positions, 0, size - 1)
    lower = np.floor(positions).astype(np.intp)
    upper = np.minimum(lower + 1, size - 1)
    shape = [1] * array.ndim
    shape[axis] = len(positions)
    weight = (positions - lower).reshape(shape).astype(array.dtype)
    below = np.take(array, lower, axis=axis)
    return below + weight * (np.take(array, upper, axis=axis) - below)


def _partial_volume_axis(stack: np.ndarray, axis: int, factor: float) -> np.ndarray:
    """Average ``stack`` along ``axis`` into bins ``factor`` pixels wide (partial
    volume, exact for non-integer factors), then interpolate linearly back to the
    pixel centres. Pixels are constant over their extent ``[i, i + 1)``."""
    size = stack.shape[axis]
    if factor <= 1 or size < 2:
        return stack
    edges = np.minimum(np.arange(math.ceil(size / factor) + 1) * factor, size)
    shape = list(stack.shape)
    shape[axis] = 1
    integral = np.concatenate(
        [np.zeros(shape), np.cumsum(stack, axis=axis, dtype=np.float64)], axis=axis
    )
    bin_shape = [1] * stack.ndim
    bin_shape[axis] = len(edges) - 1
    bins = np.diff(_lerp_along(integral, axis, edges), axis=axis) / np.diff(edges).reshape(
        bin_shape
    )
    centres = 0.5 * (edges[:-1] + edges[1:])
    pixel_in_bins = np.interp(np.arange(size) + 0.5, centres, np.arange(len(centres)))
    return _lerp_along(bins, axis, pixel_in_bins).astype(np.float32)


def low_resolution(
    unit: np.ndarray, factor: float, rng: np.random.Generator, spacing: tuple[float, ...]
) -> np.ndarray:
    """Acquire at a coarser in-plane pixel (``factor`` x the finer in-plane spacing,
    square) by area averaging, then interpolate back linearly to the original grid."""
    target = factor * min(spacing[1], spacing[2])
    out = np.empty_like(unit)
    for start in range(0, unit.shape[0], SLICES_PER_CHUNK):
        chunk = unit[start : start + SLICES_PER_CHUNK]
        chunk = _partial_volume_axis(chunk, 1, target / spacing[1])
        out[start : start + SLICES_PER_CHUNK] = _partial_volume_axis(chunk, 2, target / spacing[2])
    return out
