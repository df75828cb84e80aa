"""Test volumes: a phantom on an oblique grid, the RAS centre of a mask, and a guard
for writing DICOM with SimpleITK."""

from __future__ import annotations

import locale
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

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
