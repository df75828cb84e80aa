"""A 3D image with its geometry, read from and written to anything SimpleITK knows.

Frame: the voxel array is KJI (slice, row, column), as Slicer's
``arrayFromVolume`` returns it; ``ijk_to_ras`` is the 4x4 matrix taking a
voxel index ``(i, j, k, 1)`` to RAS millimetres. Files are LPS (ITK), so
``IJK->RAS = diag(-1, -1, 1, 1) @ [direction * spacing | origin]``.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.formats.atomic import atomic_output, full_suffix, write_refusal
from RobustMedSAMLib.formats.nifti import (
    check_complete,
    copy_placements,
    is_nifti,
    placement_warning,
)

log = logging.getLogger(__name__)


class _OnFirstUse:
    """A module imported when one of its attributes is first read: the Slicer module
    imports this file at every application start, and SimpleITK costs a noticeable
    part of a second there (Slicer's own ``slicer.util.LazyImport`` does the same)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str):
        return getattr(importlib.import_module(self._name), attribute)


sitk = _OnFirstUse("SimpleITK")  # the name every SimpleITK user knows

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""4x4 that flips L/P to R/A; it is its own inverse."""
MIN_AXIS_INDEPENDENCE = 1e-6
"""|det| of the unit voxel axes below which they count as parallel (about 1e-6 rad)."""
SMALL_EXTENT_MM = 5.0
"""A volume whose largest side is shorter than this gets a units warning."""
DICOM_TOLERANCE_VOXELS = 0.1
"""A DICOM slice further than this fraction of the smallest voxel side from where the
regular grid puts it is refused: under it, no voxel a point rounds to changes."""

# Volume files by extension (what the batch, data and pair finders look for), longest
# first so that ``.nii.gz`` wins over ``.gz``; DICOM series are folders.
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: read, never written: a header whose voxels are in a second file, which would be
#: left under the temporary name the atomic write gives it
DETACHED_SUFFIXES = (".nhdr", ".mhd")
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
        self.ijk_to_ras = _affine(self.ijk_to_ras, self.name)
        if self.array.ndim != 3:
            raise InputError(
                f"volume '{self.name}' has shape {self.array.shape}: a 3D (K, J, I) array is needed"
            )
        if self.array.dtype.kind not in "biuf":
            raise InputError(
                f"volume '{self.name}' has {self.array.dtype} voxels: a real-valued volume is "
                "needed (bool, integers or floats); take the magnitude or convert it first"
            )
        if 0 in self.array.shape:
            raise InputError(
                f"volume '{self.name}' holds no voxels (shape {self.array.shape}): an axis has "
                "length 0"
            )
        columns = self.ijk_to_ras[:3, :3]
        spacing = np.linalg.norm(columns, axis=0)
        finite = np.isfinite(self.ijk_to_ras).all() and (spacing > 0).all()
        # |det| over the product of the column lengths: 1 for orthogonal axes, whatever
        # the spacing (micrometre or metre grids), 0 for parallel or zero axes.
        if not finite or abs(np.linalg.det(columns / spacing)) < MIN_AXIS_INDEPENDENCE:
            raise InputError(
                f"volume '{self.name}' has a degenerate IJK-to-RAS matrix (spacing "
                f"{', '.join(f'{v:.4g}' for v in spacing)} mm along I, J, K): its voxel axes "
                "are zero, infinite or parallel; fix the spacing and direction in the file"
            )

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


def _affine(matrix: object, name: str) -> np.ndarray:
    """``matrix`` as a 4x4 float64 affine (last row 0 0 0 1); InputError otherwise."""
    try:
        affine = np.array(matrix, dtype=np.float64)
    except (TypeError, ValueError):
        affine = None
    if affine is None or affine.size != 16:
        shape = "no numbers" if affine is None else f"shape {affine.shape}"
        raise InputError(
            f"volume '{name}': ijk_to_ras has {shape}; give the 4x4 IJK-to-RAS matrix "
            "(Slicer: GetIJKToRASMatrix)"
        )
    affine = affine.reshape(4, 4)
    if not np.allclose(affine[3], (0.0, 0.0, 0.0, 1.0), rtol=0.0, atol=1e-9):
        raise InputError(
            f"volume '{name}': ijk_to_ras's last row is {affine[3].tolist()}, not 0 0 0 1: "
            "give an affine 4x4 IJK-to-RAS matrix"
        )
    return affine


def check_volume(volume: object) -> None:
    """InputError unless ``volume`` is a :class:`Volume` (a bare array has no geometry)."""
    if not isinstance(volume, Volume):
        raise InputError(
            f"volume must be a Volume (voxels and their ijk_to_ras), not "
            f"{type(volume).__name__}: wrap an array as Volume(array, ijk_to_ras)"
        )


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
        if path.is_symlink():
            raise InputError(
                f"volume {path} is a broken symbolic link or a link loop: point it at the file"
            )
        raise InputError(f"volume not found: {path}")
    if path.is_file() and is_nifti(path):
        check_complete(path)
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
    if 0 in image.GetSize():
        raise InputError(f"{path} holds no voxels (size {size}): an axis has length 0")
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InputError(
            f"{path} has complex voxels (size {size}): a real-valued volume is needed; "
            "save its magnitude (or real part) first"
        )
    volume = from_sitk(image, volume_name(path))
    if path.is_file() and is_nifti(path):
        warning = placement_warning(path, volume.ijk_to_ras)
        if warning:
            log.warning(warning)
    _warn_small_extent(volume, path)
    return volume


def _warn_small_extent(volume: Volume, path: Path) -> None:
    """Log a warning when the volume spans under SMALL_EXTENT_MM: metres or microns?"""
    extent = volume.spacing * np.array(volume.shape[::-1])
    if extent.max() < SMALL_EXTENT_MM:
        log.warning(
            "%s spans only %s mm (spacing %s mm): if its spacing is in metres, fix the units; "
            "millimetre sizes (blur, motion, zoom margins) act on this scale",
            path,
            " x ".join(f"{v:.3g}" for v in extent),
            ", ".join(f"{v:.3g}" for v in volume.spacing),
        )


def sitk_path(path: str | os.PathLike) -> str:
    """``path`` as a str SimpleITK can encode: its UTF-8 text.

    Under a non-UTF-8 locale Python decodes non-ASCII file names to surrogate
    escapes, which SimpleITK cannot encode (the process aborts); the original bytes
    are UTF-8 on any modern system, so they are decoded as such. InputError otherwise.
    """
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return os.fsencode(text).decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(
            f"cannot pass path {text!r} to SimpleITK: its name is not UTF-8 in this locale; "
            "rename it with UTF-8 characters or run with PYTHONUTF8=1"
        ) from None


def check_image_file(path: str | os.PathLike) -> None:
    """Raise InputError unless ``path`` (an existing file) is an image SimpleITK can read;
    reads only the header. A folder (DICOM series) and a missing path are left to
    :func:`read_volume`."""
    path = Path(path)
    if not path.is_file():
        return
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(
            f"{path} is not an image ({_sitk_message(error)}): give a NRRD, NIfTI or MHA "
            "file, or a folder holding one DICOM series"
        ) from None


def _sitk_message(error: Exception) -> str:
    """The ``sitk::ERROR`` line of a SimpleITK exception, without the C++ location; an
    ``ITK ERROR`` (which may span lines, e.g. a matrix) joined into one line."""
    text = str(error)
    match = re.search(r"sitk::ERROR:\s*(.*)", text)
    if match:
        return match.group(1).strip()
    match = re.search(r"ITK ERROR:\s*(?:\w+\(0x[0-9a-f]+\):\s*)?(.*)", text, re.DOTALL)
    return " ".join(match.group(1).split()) if match else text.strip().splitlines()[-1].strip()


def _read_file(path: Path):
    try:
        return sitk.ReadImage(sitk_path(path))
    except RuntimeError as error:
        reason = _sitk_message(error)
        if "No such file" in reason:  # the file is there: its data is short or missing
            reason = "it is truncated, or a data file its header names is missing"
        raise InputError(
            f"cannot read volume {path}: {reason}. "
            "Give a NRRD, NIfTI or MHA file, or a folder holding one DICOM series"
        ) from None


def _read_dicom_folder(path: Path, series_id: str | None):
    reader = sitk.ImageSeriesReader()
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        series = list(reader.GetGDCMSeriesIDs(sitk_path(path)))
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
    files = reader.GetGDCMSeriesFileNames(sitk_path(path), chosen)
    log.info("reading DICOM series %s (%d files) from %s", chosen, len(files), path)
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # its spacing warning: checked below
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"cannot read DICOM series in {path}: {_sitk_message(error)}") from None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    if reader.HasMetaDataKey(0, MODALITY_TAG):
        image.SetMetaData(MODALITY_TAG, reader.GetMetaData(0, MODALITY_TAG))
    positions = [
        reader.GetMetaData(k, "0020|0032")
        for k in range(len(files))
        if reader.HasMetaDataKey(k, "0020|0032")
    ]
    if len(positions) == len(files) > 1:
        try:
            numbers = np.array([_numbers(p) for p in positions], dtype=np.float64).reshape(-1, 3)
        except ValueError:
            raise InputError(
                f"DICOM series in {path} has an unreadable ImagePositionPatient "
                f"({positions[0]!r}, ...): fix or re-export the series"
            ) from None
        check_dicom_grid(path, image, numbers)
    return image


def _numbers(text: str) -> list[float]:
    """A DICOM multi-valued decimal string (``a\\b\\c``) as floats."""
    return [float(v) for v in text.strip().split("\\")]


def check_dicom_grid(path: Path, image, positions_lps: np.ndarray) -> None:
    """Refuse a DICOM series whose slices are not where the image's regular grid puts them.

    positions_lps: ``K x 3`` ImagePositionPatient of slice ``k`` of ``image`` (LPS mm).
    The step between slices off the orientation normal is a gantry tilt (sheared
    grid); a step that varies is a missing slice or uneven spacing.
    """
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = np.array(image.GetSpacing())
    origin = np.array(image.GetOrigin())
    k = np.arange(len(positions_lps))[:, None]
    gridded = origin + k * spacing[2] * direction[:, 2]
    error = np.linalg.norm(positions_lps - gridded, axis=1)
    tolerance = DICOM_TOLERANCE_VOXELS * spacing.min()
    if error.max() <= tolerance:
        return
    worst = int(error.argmax())
    steps = np.diff(positions_lps, axis=0)
    along = steps @ direction[:, 2]
    across = np.linalg.norm(steps - along[:, None] * direction[:, 2], axis=1)
    where = (
        f"slice {worst + 1} of {len(positions_lps)} would lie {error.max():.2f} mm "
        "from its file's position"
    )
    drift = positions_lps[-1] - positions_lps[0]  # sideways drift adds up over the series
    drift_along = drift @ direction[:, 2]
    drift_across = np.linalg.norm(drift - drift_along * direction[:, 2])
    if drift_across > tolerance:
        tilt = np.degrees(np.arctan2(drift_across, abs(drift_along)))
        raise InputError(
            f"DICOM series in {path} is sheared (gantry tilt of {tilt:.1f} deg: slices step "
            f"{np.median(across):.2f} mm sideways per {np.abs(np.median(along)):.2f} mm); read as "
            f"a stack, {where}. Resample it first (3D Slicer: DICOM acquisition geometry "
            "regularization, harden transform; or dcm2niix) and give the result"
        )
    gap = int(np.abs(np.abs(along) - np.median(np.abs(along))).argmax())
    raise InputError(
        f"DICOM series in {path} has uneven slice spacing ({np.abs(along).min():.3g} to "
        f"{np.abs(along).max():.3g} mm; the odd step is between slices {gap + 1} and {gap + 2}: "
        f"a missing slice?); read on a regular grid, {where}. Add the missing files, or "
        "resample the series onto a regular grid (3D Slicer: DICOM acquisition geometry "
        "regularization, harden transform) and give the result"
    )


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


def write_volume(
    volume: Volume,
    path: str | os.PathLike,
    compress: bool = True,
    placements_from: str | os.PathLike | None = None,
) -> Path:
    """Write ``volume`` where SimpleITK's extension rules say (``.nrrd``, ``.nii.gz``, ...).

    Atomic: a temporary file in the same folder replaces ``path`` only when
    complete. ``placements_from``: a NIfTI file whose voxels ``volume`` keeps (same
    grid); when ``path`` is NIfTI too it gets that file's qform and sform, both of
    them (ITK alone would write its pick twice). Returns the path written.
    """
    path = Path(path)
    if full_suffix(path) in DETACHED_SUFFIXES:
        raise InputError(
            f"cannot write {path.name}: {full_suffix(path)} keeps the voxels in a second "
            "file; write one file (.nrrd, .mha, .nii.gz)"
        )
    if full_suffix(path) == ".seg.nrrd":
        raise InputError(
            f"cannot write {path.name}: .seg.nrrd names a Slicer segmentation, and this is "
            "an image; write it as .nrrd, .mha or .nii.gz"
        )
    with atomic_output(path) as temporary:
        try:
            sitk.WriteImage(to_sitk(volume), sitk_path(temporary), compress)
        except RuntimeError as error:
            refusal = write_refusal(error, path, temporary)  # a full disk, named as such
            if refusal is not None:
                raise refusal from None
            reason = _sitk_message(error).replace(sitk_path(temporary), str(path))
            raise InputError(f"cannot write volume {path}: {reason}") from None
        if placements_from is not None and is_nifti(path) and is_nifti(placements_from):
            copy_placements(placements_from, temporary)
    return path
