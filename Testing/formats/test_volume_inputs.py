"""Volume inputs that used to read silently wrong: each is refused, warned about or read right.

Every file is generated here: tilted and gappy DICOM series, truncated NIfTI,
qform/sform pairs that disagree, micrometre grids, non-ASCII paths.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
from scipy.spatial.transform import Rotation
from slicer_headless import ijk_to_ras_of, slicer_scene_fixture
from volumes import keeping_locale

from RobustMedSAMLib.cli import main
from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.formats.volume import Volume, read_volume

slicer_scene = pytest.fixture(slicer_scene_fixture)

SHAPE = (24, 16, 16)  # K, J, I
SLICE_MM = 2.0


def write_series(folder: Path, positions_lps: np.ndarray, pixel_mm: float = 1.0) -> None:
    """One CT DICOM file per slice with IOP identity and the given ImagePositionPatient."""
    folder.mkdir()
    uid = "1.2.826.0.1.3680043.2.1125.7"
    rng = np.random.default_rng(0)
    for k, position in enumerate(positions_lps):
        image = sitk.GetImageFromArray(rng.integers(0, 1000, (1, *SHAPE[1:]), dtype=np.int16))
        image.SetSpacing((pixel_mm, pixel_mm, SLICE_MM))
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{uid}.{k + 1}",
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.9",
            "0020|000e": uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "1\\0\\0\\0\\1\\0",
        }
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        with keeping_locale():
            writer.Execute(image)


def stack_positions(count: int = SHAPE[0], sideways_per_slice: float = 0.0) -> np.ndarray:
    """Positions 2 mm apart along S, shifted ``sideways_per_slice`` mm along P per slice."""
    k = np.arange(count, dtype=float)
    return np.c_[np.zeros(count), sideways_per_slice * k, SLICE_MM * k]


def test_regular_dicom_series_reads_on_its_positions(tmp_path):
    write_series(tmp_path / "ct", stack_positions())
    volume = read_volume(tmp_path / "ct")
    assert volume.shape == SHAPE
    np.testing.assert_allclose(volume.spacing, [1, 1, SLICE_MM], atol=1e-6)


def test_tilted_dicom_series_is_refused_with_the_angle(tmp_path):
    # 20 deg gantry tilt: 0.73 mm along P per 2 mm along S, read as a stack it is 17 mm off
    write_series(tmp_path / "tilt", stack_positions(sideways_per_slice=SLICE_MM * np.tan(0.349)))
    tilt = r"gantry tilt of 20\.0 deg.*17\.\d+ mm.*Resample"
    with pytest.raises(InputError, match=tilt) as error:
        read_volume(tmp_path / "tilt")
    assert str(tmp_path / "tilt") in str(error.value)


def test_a_slight_tilt_is_named_as_a_tilt_not_as_uneven_spacing(tmp_path):
    # 0.5 deg: 0.017 mm sideways per slice, 0.4 mm over the series (0.1 voxel tolerated)
    write_series(tmp_path / "tilt", stack_positions(sideways_per_slice=SLICE_MM * np.tan(0.0087)))
    with pytest.raises(InputError, match=r"gantry tilt of 0\.5 deg"):
        read_volume(tmp_path / "tilt")


def test_dicom_series_with_a_missing_slice_is_refused_naming_the_gap(tmp_path):
    positions = np.delete(stack_positions(), 5, axis=0)  # slice 6 of 24 lost
    write_series(tmp_path / "gap", positions)
    with pytest.raises(InputError, match=r"uneven slice spacing \(2 to 4 mm.*slices 5 and 6"):
        read_volume(tmp_path / "gap")


def test_dicom_series_with_uneven_spacing_is_refused(tmp_path):
    positions = stack_positions()
    positions[12:, 2] += 1.0  # a 3 mm step at slice 12
    write_series(tmp_path / "uneven", positions)
    with pytest.raises(InputError, match=r"uneven slice spacing \(2 to 3 mm.*slices 12 and 13"):
        read_volume(tmp_path / "uneven")


def test_dicom_position_jitter_under_a_tenth_of_a_voxel_is_accepted(tmp_path):
    positions = stack_positions()
    positions[::2, 2] += 0.05  # 0.05 mm < 0.1 * 1 mm pixels
    write_series(tmp_path / "jitter", positions)
    assert read_volume(tmp_path / "jitter").shape == SHAPE


def nifti_image(rng_seed: int = 0) -> nib.Nifti1Image:
    data = np.random.default_rng(rng_seed).normal(100, 20, SHAPE[::-1]).astype(np.float32)
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    affine[:3, 3] = [-10, 20, -30]
    return nib.Nifti1Image(data, affine)


@pytest.mark.parametrize(("suffix", "kept"), [(".nii.gz", 0.5), (".nii", 0.7)])
def test_truncated_nifti_is_refused(tmp_path, suffix, kept):
    path = tmp_path / f"cut{suffix}"
    nib.save(nifti_image(), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * kept)])
    with pytest.raises(InputError, match=r"cut\.nii(\.gz)? is truncated: .*ends after") as error:
        read_volume(path)
    present, needed = map(
        int, re.search(r"after (\d+) of the (\d+) bytes", str(error.value)).groups()
    )
    assert 0.3 * needed < present < 0.8 * needed  # what is there before the cut is counted


def test_cli_refuses_truncated_nifti_with_exit_2(tmp_path, capsys):
    path = tmp_path / "cut.nii"
    nib.save(nifti_image(), path)
    path.write_bytes(path.read_bytes()[:-1000])
    out = tmp_path / "out.nii.gz"
    code = main(
        ["corrupt", str(path), "--type", "gaussian_noise", "--severity", "2", "--out", str(out)]
    )
    assert code == 2
    assert "cut.nii is truncated" in capsys.readouterr().err
    assert not out.exists()


def test_nifti_missing_only_its_gzip_trailer_still_reads(tmp_path):
    full = tmp_path / "full.nii.gz"
    nib.save(nifti_image(), full)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(full.read_bytes()[:-8])  # CRC32 and length gone, every byte of data there
    np.testing.assert_array_equal(read_volume(cut).array, read_volume(full).array)


def two_placements(path: Path, qform: np.ndarray, sform: np.ndarray, codes: tuple[int, int]):
    image = nifti_image()
    image.set_qform(qform, code=codes[0])
    image.set_sform(sform, code=codes[1])
    nib.save(image, path)


def shifted(affine: np.ndarray, mm) -> np.ndarray:
    moved = affine.copy()
    moved[:3, 3] += mm
    return moved


def test_qform_scanner_and_sform_aligned_20mm_apart_warns_and_uses_the_qform(tmp_path, caplog):
    path = tmp_path / "pair.nii.gz"
    qform = nifti_image().affine
    two_placements(path, qform, shifted(qform, [0, 20, 0]), (1, 2))
    with caplog.at_level(logging.WARNING):
        volume = read_volume(path)
    np.testing.assert_allclose(volume.ijk_to_ras, qform, atol=1e-4)  # ITK's and Slicer's pick
    (message,) = [r.getMessage() for r in caplog.records if "two placements" in r.getMessage()]
    assert "20 mm apart" in message and "using the qform" in message and "pair.nii.gz" in message


def test_both_codes_scanner_with_a_rotated_sform_warns_and_uses_the_sform(tmp_path, caplog):
    path = tmp_path / "rotated.nii.gz"
    qform = nifti_image().affine
    sform = qform.copy()
    sform[:3, :3] = Rotation.from_euler("z", 30, degrees=True).as_matrix() @ qform[:3, :3]
    two_placements(path, qform, sform, (1, 1))
    with caplog.at_level(logging.WARNING):
        volume = read_volume(path)
    np.testing.assert_allclose(volume.ijk_to_ras, sform, atol=1e-4)
    assert any("using the sform" in r.getMessage() for r in caplog.records)


def test_agreeing_qform_and_sform_say_nothing(tmp_path, caplog):
    path = tmp_path / "same.nii.gz"
    qform = nifti_image().affine
    two_placements(path, qform, qform, (1, 2))
    with caplog.at_level(logging.WARNING):
        read_volume(path)
    assert not [r for r in caplog.records if "two placements" in r.getMessage()]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_corrupt_keeps_both_nifti_transforms(tmp_path, suffix):
    path = tmp_path / f"pair{suffix}"
    qform = nifti_image().affine
    two_placements(path, qform, shifted(qform, [0, 20, 0]), (1, 2))
    out = tmp_path / f"noisy{suffix}"
    code = main(
        ["corrupt", str(path), "--type", "gaussian_noise", "--severity", "2", "--out", str(out)]
    )
    assert code == 0
    before, after = nib.load(path).header, nib.load(out).header
    for field in ("qform_code", "sform_code"):
        assert after[field] == before[field]
    np.testing.assert_allclose(after.get_qform(), before.get_qform(), atol=1e-5)
    np.testing.assert_allclose(after.get_sform(), before.get_sform(), atol=1e-5)
    assert read_volume(out).shape == SHAPE  # and ITK still reads it, on the same grid
    np.testing.assert_allclose(read_volume(out).ijk_to_ras, read_volume(path).ijk_to_ras, atol=1e-5)


def test_micrometre_spacing_is_accepted_with_a_units_warning(tmp_path, caplog):
    image = sitk.GetImageFromArray(np.zeros((4, 8, 8), np.int16))
    image.SetSpacing((1e-5, 1e-5, 2e-5))  # 0.01 mm voxels stored in metres, say
    sitk.WriteImage(image, str(tmp_path / "tiny.nrrd"))
    with caplog.at_level(logging.WARNING):
        volume = read_volume(tmp_path / "tiny.nrrd")
    np.testing.assert_allclose(volume.spacing, [1e-5, 1e-5, 2e-5])
    assert any(
        "spans only" in r.getMessage() and "metres" in r.getMessage() for r in caplog.records
    )


def test_a_degenerate_matrix_is_refused_with_its_spacing():
    matrix = np.eye(4)
    matrix[:3, 1] = matrix[:3, 0]  # J parallel to I
    with pytest.raises(InputError, match=r"degenerate IJK-to-RAS matrix \(spacing 1, 1, 1 mm"):
        Volume(np.zeros((2, 2, 2)), matrix, "flat")


def test_symlink_loop_is_named(tmp_path):
    loop = tmp_path / "loop.nrrd"
    loop.symlink_to(tmp_path / "loop.nrrd")
    with pytest.raises(InputError, match="link loop"):
        read_volume(loop)


def test_truncated_mha_says_truncated(tmp_path):
    path = tmp_path / "short.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((8, 32, 32), np.int16)), str(path))
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.6)])
    with pytest.raises(InputError, match="short.mha: it is truncated"):
        read_volume(path)


def test_non_ascii_path_in_a_non_utf8_locale(tmp_path):
    folder = tmp_path / "ünïcødé 腹部 ✓"
    folder.mkdir()
    path = folder / "vol ümé.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((3, 8, 8), np.int16)), str(path))
    script = (
        "import sys; from RobustMedSAMLib.formats.volume import read_volume, write_volume; "
        "v = read_volume(sys.argv[1]); write_volume(v, sys.argv[1] + '.copy.nrrd'); "
        "print(v.shape, sys.getfilesystemencoding())"
    )
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    done = subprocess.run(
        [sys.executable, "-c", script, os.fsencode(path)], env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout.decode().strip() == "(3, 8, 8) ascii"  # the locale really was not UTF-8
    assert Path(str(path) + ".copy.nrrd").exists()


def test_gzip_helper_counts_decompressed_bytes(tmp_path):
    from RobustMedSAMLib.formats.nifti import _gzip_length

    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(bytes(5000)))
    assert _gzip_length(path, 10_000) == 5000
    assert _gzip_length(path, 100) == 100
    two_members = gzip.compress(bytes(3000)) + gzip.compress(bytes(4000))
    path.write_bytes(two_members)
    assert _gzip_length(path, 10_000) == 7000
    path.write_bytes(two_members[:-30])  # cut inside the second member
    assert 3000 <= _gzip_length(path, 10_000) < 7000


@pytest.mark.parametrize(("codes", "rotate"), [((1, 2), False), ((1, 1), True), ((2, 1), False)])
def test_slicer_places_a_qform_sform_pair_where_we_do(tmp_path, slicer_scene, codes, rotate):
    """Slicer's own volume storage node (ITK's NIfTI reader) is the rule we follow."""
    path = tmp_path / "pair.nii.gz"
    qform = nifti_image().affine
    sform = shifted(qform, [0, 20, 0])
    if rotate:
        sform[:3, :3] = Rotation.from_euler("z", 30, degrees=True).as_matrix() @ qform[:3, :3]
    two_placements(path, qform, sform, codes)
    slicer = slicer_scene.slicer
    node = slicer_scene.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    slicer_scene.scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    np.testing.assert_allclose(read_volume(path).ijk_to_ras, ijk_to_ras_of(node), atol=1e-4)


def refused_by_both_commands(path: Path, capsys, *words: str) -> None:
    """``segment`` and ``corrupt`` on ``path``: exit 2, one line naming it and ``words``,
    nothing written beside it, the file unchanged."""
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    out = path.parent / "out.seg.nrrd"
    for command in (
        ["segment", str(path), "--points", str(path.parent / "p.mrk.json"), "--out", str(out)],
        ["corrupt", str(path), "--type", "gaussian_noise", "--severity", "2", "--out",
         str(path.parent / "noisy.nrrd")],
    ):  # fmt: skip
        code = main(command)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert str(path) in err[0] and all(word in err[0] for word in words), err[0]
    assert {p.name: p.read_bytes() for p in path.parent.iterdir()} == before


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_complex_voxels_are_refused(tmp_path, capsys, suffix):
    # segment dropped the imaginary part in silence (exit 0, NumPy's ComplexWarning only)
    path = tmp_path / f"kspace{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 8, 8), 1 + 2j, np.complex64)), str(path))
    refused_by_both_commands(path, capsys, "complex voxels", "magnitude")


def test_a_volume_without_voxels_is_refused(tmp_path, capsys):
    # an axis of length 0: "the image has no finite intensities to window" from segment,
    # "cannot write volume ...: Size: [8, 8, 0]" from corrupt; neither named the input
    path = tmp_path / "empty.mha"
    path.write_text(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "ElementSpacing = 1 1 2\nDimSize = 8 8 0\nElementType = MET_FLOAT\n"
        "ElementDataFile = LOCAL\n"
    )
    refused_by_both_commands(path, capsys, "no voxels", "8x8x0")


def test_a_singular_direction_in_the_header_is_named(tmp_path, capsys):
    # ITK's message spans lines (it prints the matrix): the refusal said only "0 0 1."
    path = tmp_path / "flat.mha"
    path.write_bytes(
        b"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        b"TransformMatrix = 1 0 0 1 0 0 0 0 1\nElementSpacing = 1 1 2\nDimSize = 8 8 4\n"
        b"ElementType = MET_UCHAR\nElementDataFile = LOCAL\n" + bytes(8 * 8 * 4)
    )
    refused_by_both_commands(path, capsys, "Bad direction, determinant is 0", "to 1 1 0 0 0 0")
