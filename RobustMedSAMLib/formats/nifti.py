"""NIfTI checks that ITK's reader does not make, done with nibabel's header parser.

- A short file: ITK reads a truncated ``.nii`` / ``.nii.gz`` without error and the
  missing voxels become 0. :func:`check_complete` compares the bytes present
  (decompressed) with ``vox_offset + voxels * bytes per voxel``.
- Two placements: a header may hold a qform and an sform that disagree. The volume
  takes the one ITK picks (so 3D Slicer, whose NIfTI reader is ITK's, shows it at
  the same place); :func:`placement_warning` words the disagreement, and
  :func:`copy_placements` writes both of the input's transforms into an output.

Frames: affines are nibabel's, voxel ``(i, j, k)`` to RAS mm.
"""

from __future__ import annotations

import gzip
import io
import os
import zlib
from pathlib import Path

import numpy as np

from RobustMedSAMLib.errors import InputError

SUFFIXES = (".nii", ".nii.gz")
XFORM_NAMES = {0: "unknown", 1: "scanner", 2: "aligned", 3: "talairach", 4: "mni", 5: "template"}
PLACEMENT_FIELDS = (
    "qform_code",
    "sform_code",
    "quatern_b",
    "quatern_c",
    "quatern_d",
    "qoffset_x",
    "qoffset_y",
    "qoffset_z",
    "srow_x",
    "srow_y",
    "srow_z",
)
AGREEMENT_VOXELS = 0.01
"""qform and sform agree when they place every corner within this fraction of a voxel."""
_CHUNK = 1 << 20


def is_nifti(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a single-file NIfTI (``.nii`` or ``.nii.gz``)."""
    return str(path).lower().endswith(SUFFIXES)


def _load_header(path: Path):
    import nibabel as nib

    try:
        return nib.load(str(path)).header
    except Exception as error:  # nibabel raises several types for a bad header
        raise InputError(f"cannot read NIfTI header of {path}: {error}") from None


def check_complete(path: str | os.PathLike) -> None:
    """Raise InputError when ``path`` holds fewer bytes than its header declares."""
    path = Path(path)
    header = _load_header(path)
    shape = header.get_data_shape()
    needed = int(header.get_data_offset()) + int(np.prod(shape)) * header.get_data_dtype().itemsize
    present = _gzip_length(path, needed) if path.name.lower().endswith(".gz") else None
    if present is None:
        present = path.stat().st_size
    if present < needed:
        layout = "decompressed " if path.name.lower().endswith(".gz") else ""
        raise InputError(
            f"{path} is truncated: its {layout}data ends after {present} of the {needed} bytes "
            f"its header declares ({'x'.join(map(str, shape))} voxels of "
            f"{header.get_data_dtype()}); copy or export the file again"
        )


def _gzip_length(path: Path, needed: int) -> int:
    """Decompressed bytes of gzip file ``path`` up to where it ends or is cut, counting
    no further than ``needed`` (and never holding more than a chunk in memory)."""
    count = 0
    inflater = zlib.decompressobj(wbits=31)  # gzip header and trailer
    with open(path, "rb") as raw:
        while count < needed:
            pending = raw.read(_CHUNK)
            if not pending:
                break  # the file ends here, cut or whole
            while pending and count < needed:
                try:
                    count += len(inflater.decompress(pending, _CHUNK))
                except zlib.error:
                    return count  # damaged from here on
                if inflater.eof:  # a member ended: another may follow
                    pending = inflater.unused_data
                    inflater = zlib.decompressobj(wbits=31)
                else:
                    pending = inflater.unconsumed_tail
    return min(count, needed)


def placements(header) -> dict[str, tuple[int, np.ndarray]]:
    """``{"qform": (code, 4x4), "sform": (code, 4x4)}`` of a nibabel NIfTI header
    (voxel IJK to RAS mm)."""
    return {
        "qform": (int(header["qform_code"]), header.get_qform()),
        "sform": (int(header["sform_code"]), header.get_sform()),
    }


def _corners(shape_ijk: tuple[int, ...]) -> np.ndarray:
    """The 8 corner voxel indices of a grid, as ``8 x 4`` homogeneous IJK."""
    ends = [(0, max(n - 1, 0)) for n in shape_ijk[:3]]
    corners = np.array(np.meshgrid(*ends, indexing="ij")).reshape(3, -1).T
    return np.c_[corners, np.ones(len(corners))]


def placement_warning(path: str | os.PathLike, ijk_to_ras: np.ndarray) -> str | None:
    """A one-line warning when ``path``'s qform and sform place the volume differently.

    ``ijk_to_ras``: the 4x4 the volume was read with (ITK's pick). None when the
    file has one placement, or both agree within ``AGREEMENT_VOXELS`` of a voxel.
    """
    header = _load_header(Path(path))
    found = placements(header)
    (qcode, qform), (scode, sform) = found["qform"], found["sform"]
    if qcode == 0 or scode == 0:
        return None
    corners = _corners(header.get_data_shape())
    q_ras, s_ras = corners @ qform.T, corners @ sform.T
    distance = float(np.linalg.norm(q_ras[:, :3] - s_ras[:, :3], axis=1).max())
    voxel = float(np.linalg.norm(np.asarray(ijk_to_ras)[:3, :3], axis=0).min())
    if distance <= AGREEMENT_VOXELS * voxel:
        return None
    read = corners @ np.asarray(ijk_to_ras).T
    used = "qform" if np.abs(read - q_ras).max() <= np.abs(read - s_ras).max() else "sform"
    other = "sform" if used == "qform" else "qform"
    return (
        f"{path} holds two placements up to {distance:.3g} mm apart: qform (code {qcode}, "
        f"{XFORM_NAMES.get(qcode, '?')}) and sform (code {scode}, {XFORM_NAMES.get(scode, '?')}); "
        f"using the {used}, as ITK and 3D Slicer do (nibabel and FSL use the sform). "
        f"If the {other} is right, rewrite the header with that one only"
    )


def copy_placements(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Give the NIfTI-1 file ``target`` the pixdim, qform and sform of NIfTI ``source``.

    For an output written from ``source``'s voxels on the same grid (same shape and
    voxel order, as ITK keeps them): both of the input's transforms survive.
    """
    import nibabel as nib

    source_header = _load_header(Path(source))
    target = Path(target)
    compressed = target.name.lower().endswith(".gz")
    raw = bytearray(gzip.decompress(target.read_bytes()) if compressed else target.read_bytes())
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw[:348])), check=False)
    for name in PLACEMENT_FIELDS:
        header[name] = source_header[name]
    pixdim = header["pixdim"].copy()
    pixdim[:4] = source_header["pixdim"][:4]
    header["pixdim"] = pixdim
    raw[:348] = header.binaryblock
    target.write_bytes(gzip.compress(bytes(raw)) if compressed else bytes(raw))
