"""A synthetic abdomen-like phantom, for demos, tests and benchmarks of the
corruptions (no patient data needed).

Frame: a 2D slice ``(rows, cols)`` or a 3D volume ``(slices, rows, cols)``
(KJI). Body, fat layer, liver with a low-contrast lesion, kidneys, spine and a
row of small vessels of decreasing size, with a fine soft-tissue texture.
"""

from __future__ import annotations

import numpy as np

from RobustMedSAMLib.corruptions.blur import convolve_slices, gaussian_kernel

# (name, centre (x, y), semi-axes (x, y)) as fractions of the slice; CT HU, MR signal
_STRUCTURES = (
    ("fat", (0.50, 0.52), (0.44, 0.34), -100.0, 320.0),
    ("muscle", (0.50, 0.53), (0.39, 0.29), 45.0, 480.0),
    ("liver", (0.36, 0.48), (0.17, 0.15), 60.0, 600.0),
    ("lesion", (0.33, 0.46), (0.045, 0.045), 35.0, 470.0),
    ("kidney_left", (0.66, 0.60), (0.06, 0.08), 150.0, 720.0),
    ("kidney_right", (0.34, 0.66), (0.05, 0.07), 150.0, 720.0),
    ("spine", (0.50, 0.72), (0.06, 0.06), 700.0, 180.0),
    ("canal", (0.50, 0.72), (0.025, 0.025), 20.0, 900.0),
)
_VESSELS = ((0.56, 0.40, 0.030), (0.64, 0.40, 0.020), (0.71, 0.40, 0.013), (0.76, 0.40, 0.008))
_BACKGROUND = {"CT": -1000.0, "MR": 0.0}
_VESSEL = {"CT": 250.0, "MR": 850.0}
_TEXTURE = {"CT": 12.0, "MR": 25.0}


def phantom(shape: tuple[int, ...] = (256, 256), modality: str = "CT", seed: int = 0) -> np.ndarray:
    """A phantom slice ``(rows, cols)`` or volume ``(slices, rows, cols)``.

    modality "CT" gives int16 Hounsfield units (air -1000, bone 700); "MR" gives
    float32 signal (background 0, tissue 300-900). Structures shrink towards the
    first and last slices of a volume.
    """
    if modality not in _BACKGROUND:
        raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}")
    stack_shape = (1, *shape) if len(shape) == 2 else tuple(shape)
    slices, rows, cols = stack_shape
    z = (np.arange(slices) + 0.5) / slices - 0.5
    scale = (1.0 - 0.8 * z**2)[:, None, None] if slices > 1 else np.ones((1, 1, 1))
    y = ((np.arange(rows) + 0.5) / rows)[None, :, None]
    x = ((np.arange(cols) + 0.5) / cols)[None, None, :]
    column = 3 if modality == "CT" else 4
    image = np.full(stack_shape, _BACKGROUND[modality], np.float32)
    for structure in _STRUCTURES:
        (cx, cy), (ax, ay) = structure[1], structure[2]
        inside = ((x - cx) / (ax * scale)) ** 2 + ((y - cy) / (ay * scale)) ** 2 <= 1
        image[inside] = structure[column]
    for cx, cy, radius in _VESSELS:
        image[(x - cx) ** 2 + (y - cy) ** 2 <= (radius * scale) ** 2] = _VESSEL[modality]
    rng = np.random.default_rng(seed)
    texture = convolve_slices(
        rng.standard_normal(stack_shape, dtype=np.float32), gaussian_kernel(1.5, (1.0, 1.0))
    )
    texture *= np.float32(_TEXTURE[modality] / max(float(texture.std()), 1e-6))
    body = image != _BACKGROUND[modality]
    image[body] += texture[body]
    image = image.reshape(shape)
    return np.rint(image).astype(np.int16) if modality == "CT" else image
