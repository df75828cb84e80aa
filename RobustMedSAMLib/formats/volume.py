"""A 3D image with its geometry, read from and written to anything SimpleITK knows.

Frame: the voxel array is KJI (slice, row, column), as Slicer's
``arrayFromVolume`` returns it; ``ijk_to_ras`` is the 4x4 matrix taking a
voxel index ``(i, j, k, 1)`` to RAS millimetres. Files are LPS (ITK), so
``IJK->RAS = diag(-1, -1, 1, 1) @ [direction * spacing | origin]``.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813 - the name every SimpleITK user knows

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.formats.atomic import atomic_output

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""4x4 that flips L/P to R/A; it is its own inverse."""

# Volume files by extension (what the batch, data and pair finders look for), longest
# first so that ``.nii.gz`` wins over ``.gz``; DICOM series are folders.
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_OTHER_SUFFIXES = (".dcm", ".img", ".hdr", ".gz")


@dataclass
class Volume:
    """A voxel array and where it lies in the patient.

    array: ``(K, J, I)`` voxels; ijk_to_ras: ``4x4`` float matrix, IJK index to
    RAS mm; name: a label for messages and output nodes; modality: what the file
    says it is (DICOM ``(0008,0060)``, e.g. ``"CT"``, ``"MR"``), None when it does not.
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray
    name: str = "volume"
    modality: str | None = None

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        self.ijk_to_ras = np.asarray(self.ijk_to_ras, dtype=np.float64).reshape(4, 4)
        if self.array.ndim != 3:
            raise InputError(
                f"volume '{self.name}' has shape {self.array.shape}: a 3D (K, J, I) array is needed"
            )
        if abs(np.linalg.det(self.ijk_to_ras[:3, :3])) < 1e-12:
            raise InputError(f"volume '{self.name}' has a singular IJK-to-RAS matrix")

    @property
    def shape(self) -> tuple[int, int, int]:
        """Voxel counts ``(K, J, I)``."""
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along I, J, K (the lengths of the matrix columns)."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def ras_to_ijk(self) -> np.ndarray:
        """4x4 inverse of ``ijk_to_ras``: RAS mm to continuous IJK index."""
        return np.linalg.inv(self.ijk_to_ras)

    def ijk_to_ras_points(self, ijk: np.ndarray) -> np.ndarray:
        """``Nx3`` IJK indices to ``Nx3`` RAS mm."""
        ijk = np.asarray(ijk, dtype=np.float64).reshape(-1, 3)
        return ijk @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]

    def ras_to_ijk_points(self, ras: np.ndarray) -> np.ndarray:
        """``Nx3`` RAS mm to ``Nx3`` continuous IJK indices."""
        ras = np.asarray(ras, dtype=np.float64).reshape(-1, 3)
        inverse = self.ras_to_ijk
        return ras @ inverse[:3, :3].T + inverse[:3, 3]


def volume_name(path: str | os.PathLike) -> str:
    """The file or folder name without its (possibly double) extension."""
    name = Path(path).name
    suffixes = "|".join(re.escape(s) for s in (*VOLUME_SUFFIXES, *_OTHER_SUFFIXES))
    return re.sub(rf"(\.seg)?({suffixes})$", "", name, flags=re.IGNORECASE) or name


def read_volume(path: str | os.PathLike, series_id: str | None = None) -> Volume:
    """Read a 3D scalar volume: a file SimpleITK reads or a folder with a DICOM series.

    ``series_id`` picks one series when the folder holds several. Raises
    InputError for a missing path, an unreadable file, a folder without a DICOM
    series, or an image that is not one 3D scalar volume.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"volume not found: {path}")
    image = _read_dicom_folder(path, series_id) if path.is_dir() else _read_file(path)
    dimension = image.GetDimension()
    size = "x".join(str(n) for n in image.GetSize())
    if dimension != 3:
        raise InputError(
            f"{path} is a {dimension}D image (size {size}): a single 3D volume is needed"
            + ("; extract one time point or channel first" if dimension > 3 else "")
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path} has {image.GetNumberOfComponentsPerPixel()} components per voxel "
            f"(size {size}): a scalar (grey-level) volume is needed"
        )
    return from_sitk(image, volume_name(path))


def _sitk_message(error: Exception) -> str:
    """The ``sitk::ERROR`` line of a SimpleITK exception, without the C++ location."""
    text = str(error)
    match = re.search(r"sitk::ERROR:\s*(.*)", text)
    return (match.group(1) if match else text.strip().splitlines()[-1]).strip()


def _read_file(path: Path):
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(
            f"cannot read volume {path}: {_sitk_message(error)}. "
            "Give a NRRD, NIfTI or MHA file, or a folder holding one DICOM series"
        ) from None


def _read_dicom_folder(path: Path, series_id: str | None):
    reader = sitk.ImageSeriesReader()
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        series = list(reader.GetGDCMSeriesIDs(str(path)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    if not series:
        raise InputError(f"no DICOM series found in folder {path}")
    if series_id is None and len(series) > 1:
        raise InputError(
            f"folder {path} holds {len(series)} DICOM series ({', '.join(series)}): "
            "choose one (series_id) or give a folder with a single series"
        )
    chosen = series_id or series[0]
    if chosen not in series:
        raise InputError(f"DICOM series {chosen} is not in {path}; found: {', '.join(series)}")
    files = reader.GetGDCMSeriesFileNames(str(path), chosen)
    log.info("reading DICOM series %s (%d files) from %s", chosen, len(files), path)
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
        if reader.HasMetaDataKey(0, MODALITY_TAG):
            image.SetMetaData(MODALITY_TAG, reader.GetMetaData(0, MODALITY_TAG))
        return image
    except RuntimeError as error:
        raise InputError(f"cannot read DICOM series in {path}: {_sitk_message(error)}") from None


MODALITY_TAG = "0008|0060"


def _modality(image) -> str | None:
    """The DICOM modality the image's metadata states (also a NRRD ``modality`` key)."""
    for key in (MODALITY_TAG, "modality", "Modality"):
        if image.HasMetaDataKey(key) and image.GetMetaData(key).strip():
            return image.GetMetaData(key).strip().upper()
    return None


def from_sitk(image, name: str = "volume") -> Volume:
    """A Volume from a 3D SimpleITK image (LPS geometry converted to RAS; the
    modality from its metadata when stated)."""
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * np.array(image.GetSpacing())
    ijk_to_lps[:3, 3] = image.GetOrigin()
    array = sitk.GetArrayFromImage(image)
    return Volume(array, LPS_TO_RAS @ ijk_to_lps, name, _modality(image))


def to_sitk(volume: Volume):
    """The volume as a SimpleITK image with LPS geometry (bool voxels become uint8)."""
    array = volume.array.astype(np.uint8) if volume.array.dtype == bool else volume.array
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    ijk_to_lps = LPS_TO_RAS @ volume.ijk_to_ras
    spacing = volume.spacing
    image.SetSpacing(spacing.tolist())
    image.SetDirection((ijk_to_lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(ijk_to_lps[:3, 3].tolist())
    return image


def write_volume(volume: Volume, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write ``volume`` where SimpleITK's extension rules say (``.nrrd``, ``.nii.gz``, ...).

    Atomic: a temporary file in the same folder replaces ``path`` only when
    complete. Returns the path written.
    """
    path = Path(path)
    with atomic_output(path) as temporary:
        try:
            sitk.WriteImage(to_sitk(volume), str(temporary), compress)
        except RuntimeError as error:
            raise InputError(f"cannot write volume {path}: {_sitk_message(error)}") from None
    return path
