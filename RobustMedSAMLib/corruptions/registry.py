"""The twelve corruption types, their five severities, and ``corrupt``.

Frame: an image is a 2D slice ``(rows, cols)`` or a 3D volume ``(slices, rows,
cols)`` in KJI order; ``spacing`` is the voxel size in mm in the same axis
order. Intensities are measured against the robust range (0.5..99.5
percentile) of the image given; see ``intensity.py``.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from RobustMedSAMLib.corruptions import blur, compression, contrast, mr_artifacts, noise
from RobustMedSAMLib.corruptions.intensity import (
    UNIT_BOUND,
    check_image,
    from_unit,
    robust_range,
    to_unit,
)
from RobustMedSAMLib.errors import InputError

log = logging.getLogger(__name__)

SEVERITIES = (1, 2, 3, 4, 5)
RANGE = "fraction of range"

Apply = Callable[[np.ndarray, float, np.random.Generator, tuple[float, ...]], np.ndarray]


@dataclass(frozen=True)
class CorruptionSpec:
    """One corruption type: what it models and its parameter at each severity.

    ``levels[s - 1]`` is the parameter at severity ``s``; ``random`` says whether
    the seed changes the result; ``apply`` works on a float32 unit-scale stack
    ``(slices, rows, cols)`` (see ``noise.py``).
    """

    name: str
    description: str
    modality: str
    parameter: str
    unit: str
    levels: tuple[float, float, float, float, float]
    random: bool
    apply: Apply = field(repr=False, compare=False)

    def level(self, severity: int) -> float:
        """The parameter at ``severity`` (1..5); InputError otherwise."""
        valid = isinstance(severity, (int, np.integer)) and not isinstance(severity, bool)
        if not valid or severity not in SEVERITIES:
            raise InputError(f"severity must be an integer from 1 to 5, got {severity!r}")
        return self.levels[int(severity) - 1]


_ALL = (
    CorruptionSpec(
        name="gaussian_noise",
        description="additive white Gaussian noise (electronic noise)",
        modality="all",
        parameter="sigma",
        unit=RANGE,
        levels=(0.01, 0.02, 0.04, 0.06, 0.09),
        random=True,
        apply=noise.gaussian_noise,
    ),
    CorruptionSpec(
        name="rician_noise",
        description="magnitude of complex Gaussian noise (MR magnitude images)",
        modality="MR",
        parameter="sigma",
        unit=RANGE,
        levels=(0.01, 0.02, 0.04, 0.06, 0.09),
        random=True,
        apply=noise.rician_noise,
    ),
    CorruptionSpec(
        name="poisson_noise",
        description="signal-dependent quantum noise, image-domain approximation",
        modality="X-ray, CT",
        parameter="photons at the range top",
        unit="counts",
        levels=(5000, 1500, 500, 200, 80),
        random=True,
        apply=noise.poisson_noise,
    ),
    CorruptionSpec(
        name="speckle_noise",
        description="multiplicative noise u (1 + sigma n)",
        modality="ultrasound",
        parameter="sigma",
        unit="relative",
        levels=(0.03, 0.06, 0.1, 0.15, 0.2),
        random=True,
        apply=noise.speckle_noise,
    ),
    CorruptionSpec(
        name="gaussian_blur",
        description="in-plane Gaussian blur (defocus, smooth reconstruction kernel)",
        modality="all",
        parameter="sigma",
        unit="mm",
        levels=(0.5, 1.0, 1.5, 2.0, 2.5),
        random=False,
        apply=blur.gaussian_blur,
    ),
    CorruptionSpec(
        name="motion_blur",
        description="in-plane linear motion blur in a random direction",
        modality="all",
        parameter="path length",
        unit="mm",
        levels=(2.0, 4.0, 6.0, 9.0, 12.0),
        random=True,
        apply=blur.motion_blur,
    ),
    CorruptionSpec(
        name="low_resolution",
        description="partial-volume averaging to coarser square pixels, linear upsampling",
        modality="all",
        parameter="pixel size",
        unit="x finer in-plane spacing",
        levels=(1.5, 2.0, 3.0, 4.0, 6.0),
        random=False,
        apply=blur.low_resolution,
    ),
    CorruptionSpec(
        name="motion_ghosting",
        description="periodic motion along phase encoding (rows) during acquisition: ghosts",
        modality="MR",
        parameter="motion amplitude",
        unit="mm",
        levels=(0.25, 0.5, 1.0, 1.5, 2.5),
        random=True,
        apply=mr_artifacts.motion_ghosting,
    ),
    CorruptionSpec(
        name="kspace_spike",
        description="one bright k-space sample per slice: herringbone stripes",
        modality="MR",
        parameter="stripe amplitude",
        unit=RANGE,
        levels=(0.02, 0.04, 0.07, 0.1, 0.15),
        random=True,
        apply=mr_artifacts.kspace_spike,
    ),
    CorruptionSpec(
        name="bias_field",
        description="smooth multiplicative field exp(a p), p a random cubic with max |p| = 1",
        modality="MR",
        parameter="a (peak of the log field)",
        unit="natural log",
        levels=(0.1, 0.2, 0.35, 0.5, 0.7),
        random=True,
        apply=mr_artifacts.bias_field,
    ),
    CorruptionSpec(
        name="gamma_contrast",
        description="non-linear contrast change u ** gamma over the range",
        modality="all",
        parameter="gamma",
        unit="exponent",
        levels=(1.15, 1.35, 1.6, 2.0, 2.5),
        random=False,
        apply=contrast.gamma_contrast,
    ),
    CorruptionSpec(
        name="jpeg_compression",
        description="baseline JPEG of every slice (8 bits over the range)",
        modality="all",
        parameter="quality",
        unit="JPEG quality 1-95",
        levels=(60, 40, 25, 15, 8),
        random=False,
        apply=compression.jpeg_compression,
    ),
)

CORRUPTIONS: dict[str, CorruptionSpec] = {spec.name: spec for spec in _ALL}
"""Every corruption type by name, in the order of the README's table."""


def get_corruption(name: str) -> CorruptionSpec:
    """The spec called ``name``; InputError listing the valid names otherwise."""
    try:
        return CORRUPTIONS[name]
    except (KeyError, TypeError):
        raise InputError(
            f"unknown corruption type {name!r}; choose one of: {', '.join(CORRUPTIONS)}"
        ) from None


def _stack_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, float, float]:
    """Spacing in mm for the internal ``(slices, rows, cols)`` stack (1 mm by default)."""
    if spacing is None:
        return (1.0, 1.0, 1.0)
    values = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if values.size != ndim or not np.isfinite(values).all() or (values <= 0).any():
        raise InputError(
            f"spacing {list(spacing)} does not fit a {ndim}D image: give {ndim} positive "
            "voxel sizes in mm, in the array's axis order"
        )
    values = values.tolist()
    return tuple(values) if ndim == 3 else (1.0, *values)  # type: ignore[return-value]


def _generator(seed: int, name: str) -> np.random.Generator:
    """A generator for ``seed`` and this type only (types do not share streams)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(name.encode())]))


def corrupt(
    image: np.ndarray,
    name: str,
    severity: int,
    seed: int = 0,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """``image`` degraded by corruption ``name`` at ``severity`` (1 mild .. 5 heavy).

    image: 2D ``(rows, cols)`` or 3D ``(slices, rows, cols)``, any integer or
    float dtype; spacing: mm per axis in that order (default 1 mm). Corruptions
    act within slices, except the bias field, which is smooth in 3D. The same
    seed gives the same result; for random types it also gives the same pattern
    at every severity. Returns a new array of the same shape and dtype (integers
    rounded and clipped to the dtype's range); the input is left untouched.
    """
    spec = get_corruption(name)
    level = spec.level(severity)
    rng = _generator(seed, name)
    image = np.asarray(image)
    check_image(image)
    stack_spacing = _stack_spacing(spacing, image.ndim)
    if image.size == 0:
        return image.copy()
    _warn_if_larger_than_slice(spec, level, image.shape[-2:], stack_spacing[1:])
    scale = robust_range(image)
    stack = to_unit(image, scale).reshape((-1, *image.shape[-2:]))
    outliers = np.abs(stack) >= UNIT_BOUND  # clipped in unit scale: they pass through
    degraded = spec.apply(stack, level, rng, stack_spacing)
    out = from_unit(degraded.reshape(image.shape), scale, image.dtype)
    if outliers.any():
        out[outliers.reshape(image.shape)] = image[outliers.reshape(image.shape)]
    return out


def _warn_if_larger_than_slice(
    spec: CorruptionSpec, level: float, shape_rc: tuple[int, ...], spacing_rc: tuple[float, ...]
) -> None:
    """Log a warning when a millimetre-sized corruption exceeds half the slice's extent:
    the image is wiped out, which usually means spacing in metres read as mm."""
    if spec.unit != "mm":
        return
    extent = min(n * s for n, s in zip(shape_rc, spacing_rc, strict=True))
    if level > extent / 2:
        log.warning(
            "%s %g mm is %.0f pixels at spacing %s mm, more than half the slice "
            "(%.3g mm across): the image will be wiped out. Check the spacing units "
            "(metres vs millimetres)",
            spec.name,
            level,
            level / min(spacing_rc),
            " x ".join(f"{s:.3g}" for s in spacing_rc),
            extent,
        )


def corruption_table() -> str:
    """The types and their parameter at each severity, as plain text (the CLI prints it)."""
    header = ["name", "modality", "parameter [unit]", *(f"s{s}" for s in SEVERITIES)]
    rows = [
        [spec.name, spec.modality, f"{spec.parameter} [{spec.unit}]", *map(_number, spec.levels)]
        for spec in CORRUPTIONS.values()
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.ljust(w) if i < 3 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    lines.extend(f"{spec.name}: {spec.description}" for spec in CORRUPTIONS.values())
    lines.append(
        "range = 0.5 to 99.5 percentile of the image's intensities; "
        "severity 1 is barely visible, 5 heavily degraded but readable."
    )
    return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:g}"
