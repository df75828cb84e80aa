"""Synthetic 3D phantoms with known masks, for tests, benchmarks and training.

Arrays are KJI ``(slices, rows, cols)``; geometry parameters (centres, radii,
semi-axes) are in millimetres in IJK order ``(x, y, z) = (i, j, k) * spacing``,
so a phantom keeps its true shape on an anisotropic grid. Every phantom is
seeded: the same arguments give the same image.

Textures: ``"ct"`` gives int16 Hounsfield units (soft-tissue background about
40 HU, objects brighter or darker by their contrast, Gaussian noise, a little
partial-volume blur); ``"mr"`` gives float32 arbitrary units with a smooth
multiplicative bias field and Rician noise (magnitude of complex Gaussian noise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from RobustMedSAMLib.errors import InputError

Texture = Literal["ct", "mr"]
Shape = tuple[int, int, int]
Vec3 = tuple[float, float, float]

CT_BACKGROUND_HU = 40.0
MR_BACKGROUND = 100.0
_BLUR_VOXELS = 0.6


@dataclass
class Phantom:
    """A synthetic volume and its truth.

    image: ``(K, J, I)`` int16 HU (CT-like) or float32 (MR-like); mask: ``(K, J, I)``
    bool, the target object; spacing: ``(I, J, K)`` voxel size in mm; labels:
    ``(K, J, I)`` uint8 label map of every object (0 = background) and
    label_names: value -> name.
    """

    image: np.ndarray
    mask: np.ndarray
    spacing: Vec3
    labels: np.ndarray
    label_names: dict[int, str] = field(default_factory=dict)

    @property
    def ijk_to_ras(self) -> np.ndarray:
        """4x4 IJK->RAS of an ITK image with identity (LPS) direction at origin 0."""
        sx, sy, sz = self.spacing
        return np.diag([-sx, -sy, sz, 1.0])


def sphere(
    shape: Shape = (64, 64, 64),
    spacing: Vec3 = (1.0, 1.0, 1.0),
    radius: float = 20.0,
    center: Vec3 | None = None,
    texture: Texture = "ct",
    contrast: float | None = None,
    noise: float | None = None,
    seed: int = 0,
) -> Phantom:
    """A ball of ``radius`` mm around ``center`` (mm, IJK order; default: volume centre)."""
    return ellipsoid(
        shape,
        spacing,
        (radius, radius, radius),
        (0.0, 0.0, 0.0),
        center,
        texture,
        contrast,
        noise,
        seed,
    )


def ellipsoid(
    shape: Shape = (64, 64, 64),
    spacing: Vec3 = (1.0, 1.0, 1.0),
    semi_axes: Vec3 = (22.0, 14.0, 18.0),
    rotation_deg: Vec3 = (0.0, 0.0, 0.0),
    center: Vec3 | None = None,
    texture: Texture = "ct",
    contrast: float | None = None,
    noise: float | None = None,
    seed: int = 0,
) -> Phantom:
    """An ellipsoid with ``semi_axes`` (mm, along I, J, K before rotation), turned by
    ``rotation_deg`` about the I, J and K axes (extrinsic, in that order)."""
    x, y, z = _grid_mm(shape, spacing)
    inside = _ellipsoid_mask((x, y, z), _center(shape, spacing, center), semi_axes, rotation_deg)
    labels = inside.astype(np.uint8)
    image = _single_object_image(labels, texture, contrast, noise, seed)
    return Phantom(image, inside, _spacing(spacing), labels, {1: "ellipsoid"})


def tube(
    shape: Shape = (64, 64, 64),
    spacing: Vec3 = (1.0, 1.0, 1.0),
    radius: float = 7.0,
    amplitude: tuple[float, float] = (8.0, 5.0),
    slice_range: tuple[int, int] | None = None,
    center: Vec3 | None = None,
    texture: Texture = "ct",
    contrast: float | None = None,
    noise: float | None = None,
    seed: int = 0,
) -> Phantom:
    """A curved cylinder along K: on slices ``slice_range`` = (first, last) inclusive
    (default: the central three quarters) a disc of ``radius`` mm whose centre
    moves in x, y by up to ``amplitude`` mm on one period of a sine / cosine wave."""
    k_count = shape[0]
    first, last = (
        slice_range if slice_range is not None else (k_count // 8, k_count - 1 - k_count // 8)
    )
    if not 0 <= first <= last < k_count:
        raise InputError(f"tube slice_range {(first, last)} must lie in 0..{k_count - 1}")
    x, y, z = _grid_mm(shape, spacing)
    cx, cy, _ = _center(shape, spacing, center)
    k = np.arange(k_count, dtype=np.float64).reshape(-1, 1, 1)
    phase = 2 * np.pi * (k - first) / max(last - first, 1)
    line_x = cx + amplitude[0] * np.sin(phase)
    line_y = cy + amplitude[1] * (1 - np.cos(phase)) / 2
    inside = (x - line_x) ** 2 + (y - line_y) ** 2 <= radius**2
    inside &= (k >= first) & (k <= last)
    labels = inside.astype(np.uint8)
    image = _single_object_image(labels, texture, contrast, noise, seed)
    return Phantom(image, inside, _spacing(spacing), labels, {1: "tube"})


def rim_lesion(
    shape: Shape = (16, 128, 128),
    spacing: Vec3 = (0.8, 0.8, 5.0),
    radius: float = 9.0,
    rim: float = 2.5,
    intensities: tuple[float, float] = (165.0, 27.0),
    seed: int = 0,
) -> Phantom:
    """A ring-enhancing lesion on thick MR slices: a ball of ``radius`` mm whose outer
    ``rim`` mm is bright and whose core is dark (``intensities``: rim, core), so that
    its mean on its central slice is close to what surrounds it; beside it, two tubes
    through every slice (one dark, one bright), which a box carried past the lesion's
    end finds. ``mask``: the lesion; ``labels``: 1 rim, 2 core, 3 and 4 the tubes."""
    x, y, z = _grid_mm(shape, spacing)
    cx, cy, cz = _center(shape, spacing, None)
    distance = np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2)
    lesion = np.broadcast_to(distance <= radius, shape)
    labels = np.zeros(shape, np.uint8)
    tubes = [(radius + 5.0, 0.0, 5.0), (-(radius + 3.0), 0.6 * radius, 4.0)]
    for value, (dx, dy, tube_radius) in enumerate(tubes, start=3):
        disc = (x - cx - dx) ** 2 + (y - cy - dy) ** 2 <= tube_radius**2
        labels[np.broadcast_to(disc, shape)] = value
    labels[lesion & (distance > radius - rim)] = 1
    labels[lesion & (distance <= radius - rim)] = 2
    table = {1: intensities[0], 2: intensities[1], 3: 40.0, 4: 170.0}
    image = _texture(labels, table, MR_BACKGROUND, "mr", None, seed)
    names = {1: "rim", 2: "core", 3: "dark_tube", 4: "bright_tube"}
    return Phantom(image, lesion.copy(), _spacing(spacing), labels, names)


# name -> (CT HU, MR intensity); drawn in this order, later objects over earlier ones.
ORGAN_INTENSITIES: dict[str, tuple[float, float]] = {
    "body": (CT_BACKGROUND_HU, MR_BACKGROUND),
    "liver": (110.0, 220.0),
    "spleen": (125.0, 170.0),
    "kidney_left": (180.0, 260.0),
    "kidney_right": (180.0, 260.0),
    "aorta": (260.0, 400.0),
    "lesion": (60.0, 140.0),
}


def organ_scene(
    shape: Shape = (64, 96, 96),
    spacing: Vec3 = (1.0, 1.0, 2.0),
    target: str = "liver",
    texture: Texture = "ct",
    noise: float | None = None,
    seed: int = 0,
) -> Phantom:
    """An abdomen-like scene: a body (soft tissue, air outside) holding a liver with
    a darker lesion, a spleen, two kidneys and a curved bright aorta. Positions
    scale with the field of view. ``mask`` is ``labels == target`` (the liver
    mask excludes the lesion); ``label_names`` lists every object."""
    names = [n for n in ORGAN_INTENSITIES if n != "body"]
    if target not in names:
        raise InputError(f"unknown organ_scene target {target!r}: choose one of {', '.join(names)}")
    points = _grid_mm(shape, spacing)
    x, y, z = points
    size = np.array([shape[2], shape[1], shape[0]], dtype=np.float64) * np.asarray(spacing)
    labels = np.zeros(shape, np.uint8)
    objects = _organ_shapes(points, size)
    label_names: dict[int, str] = {}
    for value, name in enumerate(ORGAN_INTENSITIES, start=1):
        labels[objects[name]] = value
        label_names[value] = name
    table = {v: ORGAN_INTENSITIES[n][0 if texture == "ct" else 1] for v, n in label_names.items()}
    background = -1000.0 if texture == "ct" else 0.0
    image = _texture(labels, table, background, texture, noise, seed)
    target_value = next(v for v, n in label_names.items() if n == target)
    return Phantom(image, labels == target_value, _spacing(spacing), labels, label_names)


def random_scene(
    shape: Shape = (32, 128, 128),
    spacing: Vec3 = (1.0, 1.0, 2.0),
    texture: Texture = "ct",
    n_objects: int | None = None,
    seed: int = 0,
) -> Phantom:
    """Two to five random ellipsoids and at most one tube, at random places, sizes,
    rotations and intensities (brighter or darker than the background), later ones
    drawn over earlier ones; for training data that does not teach fixed positions.
    ``mask`` is the largest object; ``labels`` numbers every object from 1."""
    rng = np.random.default_rng(seed)
    x, y, z = _grid_mm(shape, spacing)
    size = np.array([shape[2], shape[1], shape[0]], np.float64) * np.asarray(spacing)
    count = int(rng.integers(2, 6)) if n_objects is None else n_objects
    labels = np.zeros(shape, np.uint8)
    for value in range(1, count + 1):
        centre = size * rng.uniform(0.2, 0.8, 3)
        if value == count and rng.random() < 0.3:
            radius = float(size[:2].min() * rng.uniform(0.04, 0.1))
            inside = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= radius**2
            inside = np.broadcast_to(inside, shape) & (z >= 0.1 * size[2]) & (z <= 0.9 * size[2])
        else:
            axes = size * rng.uniform(0.06, 0.3, 3)
            axes[2] = max(axes[2], 2.5 * spacing[2])
            inside = _ellipsoid_mask(
                (x, y, z), tuple(centre), tuple(axes), tuple(rng.uniform(-40, 40, 3))
            )
        labels[np.broadcast_to(inside, shape)] = value
    background = CT_BACKGROUND_HU if texture == "ct" else MR_BACKGROUND
    scale = 1.0 if texture == "ct" else 1.25
    table = {}
    for value in range(1, count + 1):
        delta = rng.uniform(50, 220) if rng.random() < 0.75 else -rng.uniform(35, 90)
        table[value] = background + scale * delta
    image = _texture(labels, table, background, texture, None, seed)
    values, areas = np.unique(labels[labels > 0], return_counts=True)
    target = int(values[np.argmax(areas)]) if len(values) else 1
    names = {v: f"object_{v}" for v in range(1, count + 1)}
    return Phantom(image, labels == target, _spacing(spacing), labels, names)


def _organ_shapes(points: tuple[np.ndarray, ...], size: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks of the scene's objects; coordinates as fractions of ``size`` (mm)."""
    x, y, z = points
    sx, sy, sz = size

    def blob(c: Vec3, a: Vec3, rot: Vec3 = (0.0, 0.0, 0.0)) -> np.ndarray:
        centre = (c[0] * sx, c[1] * sy, c[2] * sz)
        return _ellipsoid_mask(points, centre, (a[0] * sx, a[1] * sy, a[2] * sz), rot)

    body = ((x - 0.5 * sx) / (0.46 * sx)) ** 2 + ((y - 0.5 * sy) / (0.36 * sy)) ** 2 <= 1
    body = np.broadcast_to(body, np.broadcast_shapes(x.shape, y.shape, z.shape))
    aorta_x = 0.52 * sx + 0.03 * sx * np.sin(2 * np.pi * z / sz)
    aorta = ((x - aorta_x) ** 2 + (y - 0.66 * sy) ** 2 <= (0.035 * sx) ** 2) & (z >= 0.05 * sz)
    return {
        "body": body,
        "liver": blob((0.32, 0.45, 0.55), (0.20, 0.15, 0.32), (0.0, 0.0, 20.0)),
        "spleen": blob((0.74, 0.50, 0.62), (0.07, 0.09, 0.17)),
        "kidney_left": blob((0.68, 0.68, 0.40), (0.05, 0.07, 0.16), (0.0, 0.0, -15.0)),
        "kidney_right": blob((0.36, 0.70, 0.38), (0.05, 0.07, 0.16), (0.0, 0.0, 15.0)),
        "aorta": aorta,
        "lesion": blob((0.30, 0.42, 0.58), (0.04, 0.04, 0.08)),
    }


def _single_object_image(
    labels: np.ndarray, texture: Texture, contrast: float | None, noise: float | None, seed: int
) -> np.ndarray:
    """Background plus one object brighter by ``contrast`` (default 80 HU / 100 a.u.)."""
    if texture == "ct":
        background, default_contrast = CT_BACKGROUND_HU, 80.0
    else:
        background, default_contrast = MR_BACKGROUND, 100.0
    delta = default_contrast if contrast is None else float(contrast)
    return _texture(labels, {1: background + delta}, background, texture, noise, seed)


def _texture(
    labels: np.ndarray,
    table: dict[int, float],
    background: float,
    texture: Texture,
    noise: float | None,
    seed: int,
) -> np.ndarray:
    """Piecewise-constant intensities, partial-volume blur, then the texture's noise."""
    if texture not in ("ct", "mr"):
        raise InputError(f"unknown texture {texture!r}: choose 'ct' or 'mr'")
    lut = np.full(256, background, np.float32)
    for value, intensity in table.items():
        lut[value] = intensity
    clean = ndimage.gaussian_filter(lut[labels], _BLUR_VOXELS)
    rng = np.random.default_rng(seed)
    if texture == "ct":
        sigma = 12.0 if noise is None else float(noise)
        noisy = clean + rng.normal(0.0, sigma, clean.shape).astype(np.float32)
        return np.clip(np.rint(noisy), -1024, 3071).astype(np.int16)
    sigma = 8.0 if noise is None else float(noise)
    biased = clean * _bias_field(labels.shape, rng)
    real = biased + rng.normal(0.0, sigma, clean.shape).astype(np.float32)
    imag = rng.normal(0.0, sigma, clean.shape).astype(np.float32)
    return np.hypot(real, imag).astype(np.float32)


def _bias_field(shape: Shape, rng: np.random.Generator, strength: float = 0.3) -> np.ndarray:
    """Smooth multiplicative field ``exp(quadratic polynomial)`` ranging about ±strength."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    k, j, i = np.meshgrid(*axes, indexing="ij", sparse=True)
    terms = [k, j, i, k * j, j * i, k * i, k * k, j * j, i * i]
    coefficients = rng.uniform(-1.0, 1.0, len(terms)).astype(np.float32)
    log_field = sum(c * t for c, t in zip(coefficients, terms, strict=True))
    span = float(np.abs(log_field).max()) or 1.0
    return np.exp(log_field * (np.log1p(strength) / span)).astype(np.float32)


def _ellipsoid_mask(
    points: tuple[np.ndarray, ...], center: Vec3, semi_axes: Vec3, rotation_deg: Vec3
) -> np.ndarray:
    """Voxels whose mm position lies in the rotated ellipsoid."""
    if min(semi_axes) <= 0:
        raise InputError(f"semi-axes {tuple(semi_axes)} mm must all be positive")
    x, y, z = (p - c for p, c in zip(points, center, strict=True))
    inverse = Rotation.from_euler("xyz", rotation_deg, degrees=True).inv().as_matrix()
    total = 0.0
    for row, axis in zip(inverse, semi_axes, strict=True):
        local = row[0] * x + row[1] * y + row[2] * z
        total = total + (local / axis) ** 2
    return np.asarray(total <= 1.0)


def _grid_mm(shape: Shape, spacing: Vec3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcastable x ``(1,1,I)``, y ``(1,J,1)``, z ``(K,1,1)`` voxel centres in mm."""
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"phantom shape {tuple(shape)} must be three positive sizes (K, J, I)")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise InputError(f"spacing {tuple(spacing)} must be three positive sizes in mm (I, J, K)")
    k, j, i = shape
    x = (np.arange(i) * spacing[0]).reshape(1, 1, -1)
    y = (np.arange(j) * spacing[1]).reshape(1, -1, 1)
    z = (np.arange(k) * spacing[2]).reshape(-1, 1, 1)
    return x, y, z


def _center(shape: Shape, spacing: Vec3, center: Vec3 | None) -> Vec3:
    """The given centre, or the volume centre, in mm (IJK order)."""
    if center is not None:
        return (float(center[0]), float(center[1]), float(center[2]))
    k, j, i = shape
    return ((i - 1) * spacing[0] / 2, (j - 1) * spacing[1] / 2, (k - 1) * spacing[2] / 2)


def _spacing(spacing: Vec3) -> Vec3:
    return (float(spacing[0]), float(spacing[1]), float(spacing[2]))
