"""Test volumes: a phantom on an oblique grid, the RAS centre of a mask, and a guard
for writing DICOM with SimpleITK."""

from __future__ import annotations

import locale
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from RobustMedSAMLib.datasets import phantoms
from RobustMedSAMLib.formats.volume import Volume


def oblique(phantom) -> Volume:
    """The phantom on an oblique, anisotropic grid (rotated 20 degrees about S)."""
    angle = np.deg2rad(20)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag(phantom.spacing)
    matrix[:3, 3] = (12.0, -30.0, 5.0)
    return Volume(phantom.image, matrix, "phantom")


def centre_ras(volume: Volume, mask: np.ndarray) -> np.ndarray:
    kji = np.argwhere(mask).mean(axis=0)
    return volume.ijk_to_ras_points(kji[::-1])


@contextmanager
def keeping_locale() -> Iterator[None]:
    """Restore the process locale afterwards: SimpleITK's GDCM DICOM writer sets it to
    "C", and later text I/O in the same pytest process (``read_text``, ``subprocess``
    with ``text=True``) then decodes as ASCII."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def organ(centre=None) -> tuple[Volume, np.ndarray]:
    """A bright ellipsoid organ, 24 slices of 96 x 96 px (``centre``: mm, I J K order),
    and its mask."""
    phantom = phantoms.ellipsoid((24, 96, 96), (1.0, 1.0, 2.0), (30.0, 22.0, 20.0), center=centre,
                                 contrast=150.0, noise=10.0)  # fmt: skip
    return Volume(phantom.image.astype(np.float32), phantom.ijk_to_ras, "organ"), phantom.mask


def truth_box(truth: np.ndarray, index: int, fraction: float) -> np.ndarray:
    """The box of ``truth`` on slice ``index``, every side moved out by ``fraction`` of
    its extent (in if < 0)."""
    rows, cols = np.nonzero(truth[index])
    dx = round(fraction * (cols.max() - cols.min() + 1))
    dy = round(fraction * (rows.max() - rows.min() + 1))
    return np.array([cols.min() - dx, rows.min() - dy, cols.max() + dx, rows.max() + dy])
