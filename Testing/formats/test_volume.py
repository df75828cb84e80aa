"""Reading and writing volumes: geometry exact for oblique, anisotropic grids."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
from scipy.spatial.transform import Rotation
from slicer_headless import add_volume, ijk_to_ras_of, slicer_scene_fixture
from volumes import keeping_locale

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.formats.volume import Volume, read_volume, write_volume

slicer_scene = pytest.fixture(slicer_scene_fixture)

SPACING = np.array([0.7, 1.1, 3.0])  # I, J, K mm
ORIGIN_LPS = np.array([-12.5, 30.0, 101.0])
DIRECTION_LPS = Rotation.from_euler("zyx", [25, -10, 15], degrees=True).as_matrix()


def sitk_image(shape=(5, 6, 7)) -> sitk.Image:
    """An oblique, anisotropic int16 image whose voxel value is its flat KJI index."""
    image = sitk.GetImageFromArray(np.arange(np.prod(shape), dtype=np.int16).reshape(shape))
    image.SetSpacing(SPACING.tolist())
    image.SetOrigin(ORIGIN_LPS.tolist())
    image.SetDirection(DIRECTION_LPS.ravel().tolist())
    return image


def expected_ras(ijk) -> np.ndarray:
    """RAS of a voxel computed from the LPS definition, independently of the code."""
    lps = ORIGIN_LPS + DIRECTION_LPS @ (SPACING * np.asarray(ijk, float))
    return lps * [-1, -1, 1]


def oblique_volume(shape=(5, 6, 7)) -> Volume:
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = np.diag([-1, -1, 1]) @ DIRECTION_LPS @ np.diag(SPACING)
    ijk_to_ras[:3, 3] = ORIGIN_LPS * [-1, -1, 1]
    return Volume(np.arange(np.prod(shape), dtype=np.int16).reshape(shape), ijk_to_ras, "v")


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_known_voxel_lands_at_known_ras(tmp_path, suffix):
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(sitk_image(), str(path))
    volume = read_volume(path)
    assert volume.shape == (5, 6, 7)
    assert volume.name == "ct"
    np.testing.assert_allclose(volume.spacing, SPACING, atol=1e-5)
    i, j, k = 6, 2, 4
    assert volume.array[k, j, i] == np.ravel_multi_index((k, j, i), (5, 6, 7))
    np.testing.assert_allclose(
        volume.ijk_to_ras_points([i, j, k])[0], expected_ras([i, j, k]), atol=1e-4
    )
    np.testing.assert_allclose(
        volume.ras_to_ijk_points(expected_ras([i, j, k]))[0], [i, j, k], atol=1e-4
    )


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_write_then_read_is_identical(tmp_path, suffix):
    volume = oblique_volume()
    path = write_volume(volume, tmp_path / f"out{suffix}")
    again = read_volume(path)
    np.testing.assert_array_equal(again.array, volume.array)
    np.testing.assert_allclose(again.ijk_to_ras, volume.ijk_to_ras, atol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left


def write_dicom_series(folder, image: sitk.Image, series_uid="1.2.826.0.1.3680043.2.1125.1"):
    """One DICOM file per slice, with the position/orientation tags of an oblique series."""
    folder.mkdir(exist_ok=True)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = np.array(image.GetSpacing())
    for k in range(image.GetSize()[2]):
        slice_ = image[:, :, k : k + 1]
        position = np.array(image.GetOrigin()) + k * spacing[2] * direction[:, 2]
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.9",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in np.r_[direction[:, 0], direction[:, 1]]),
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"{series_uid[-3:]}_{k:03d}.dcm"))
        with keeping_locale():  # GDCM's writer sets the locale to "C"
            writer.Execute(slice_)


def test_dicom_series_folder(tmp_path):
    write_dicom_series(tmp_path / "series", sitk_image())
    volume = read_volume(tmp_path / "series")
    assert volume.shape == (5, 6, 7)
    assert volume.array[4, 2, 6] == np.ravel_multi_index((4, 2, 6), (5, 6, 7))
    np.testing.assert_allclose(volume.spacing, SPACING, atol=1e-4)
    np.testing.assert_allclose(
        volume.ijk_to_ras_points([6, 2, 4])[0], expected_ras([6, 2, 4]), atol=1e-3
    )


def test_dicom_folder_with_two_series_asks_which(tmp_path):
    write_dicom_series(tmp_path / "mixed", sitk_image(), "1.2.826.0.1.3680043.2.1125.1")
    write_dicom_series(tmp_path / "mixed", sitk_image(), "1.2.826.0.1.3680043.2.1125.2")
    with pytest.raises(InputError, match="2 DICOM series"):
        read_volume(tmp_path / "mixed")
    volume = read_volume(tmp_path / "mixed", series_id="1.2.826.0.1.3680043.2.1125.2")
    assert volume.shape == (5, 6, 7)


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_volume(tmp_path / "nothing.nrrd")


def test_corrupt_file(tmp_path):
    path = tmp_path / "broken.nrrd"
    path.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 9 9 9\nencoding: raw\n\n12")
    with pytest.raises(InputError, match="cannot read volume .*broken.nrrd"):
        read_volume(path)


def test_empty_folder_is_not_a_dicom_series(tmp_path):
    with pytest.raises(InputError, match="no DICOM series"):
        read_volume(tmp_path)


def test_2d_image_says_its_shape(tmp_path):
    path = tmp_path / "photo.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5), np.uint8)), str(path))
    with pytest.raises(InputError, match=r"2D image \(size 5x4\)"):
        read_volume(path)


def test_4d_image_says_its_shape(tmp_path):
    path = tmp_path / "dwi.nii.gz"
    sitk.WriteImage(
        sitk.GetImageFromArray(np.zeros((3, 4, 5, 6), np.float32), isVector=False), str(path)
    )
    with pytest.raises(InputError, match=r"4D image \(size 6x5x4x3\).*time point"):
        read_volume(path)


def test_colour_image_is_refused(tmp_path):
    path = tmp_path / "rgb.nrrd"
    rgb = np.zeros((3, 4, 5, 3), np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))
    with pytest.raises(InputError, match="3 components per voxel"):
        read_volume(path)


def test_failed_write_keeps_existing_file(tmp_path):
    path = tmp_path / "out.xyz"
    path.write_text("keep me")
    with pytest.raises(InputError, match="cannot write volume") as refusal:
        write_volume(oblique_volume(), path)
    assert f'"{path}"' in str(refusal.value)  # the user's file, not the temporary one
    assert path.read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["out.xyz"]


@pytest.mark.parametrize("suffix", [".mhd", ".nhdr"])
def test_header_and_data_pair_is_refused_before_writing(tmp_path, suffix):
    # the data file would keep the temporary name the atomic write gives the header
    with pytest.raises(InputError, match=f"cannot write out{suffix}: .* second file"):
        write_volume(oblique_volume(), tmp_path / f"out{suffix}")
    assert list(tmp_path.iterdir()) == []


def test_volume_written_by_slicer(tmp_path, slicer_scene):
    slicer = slicer_scene.slicer
    volume = oblique_volume()
    node = add_volume(slicer_scene, volume.array, volume.ijk_to_ras)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    slicer_scene.scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "slicer.nrrd"))
    assert storage.WriteData(node)

    ours = read_volume(tmp_path / "slicer.nrrd")
    np.testing.assert_array_equal(ours.array, volume.array)
    ijk = [5, 1, 3]
    slicer_ras = ijk_to_ras_of(node) @ [*ijk, 1]
    np.testing.assert_allclose(ours.ijk_to_ras_points(ijk)[0], slicer_ras[:3], atol=1e-6)
    np.testing.assert_allclose(slicer_ras[:3], expected_ras(ijk), atol=1e-6)


def test_slicer_reads_what_we_write(tmp_path, slicer_scene):
    slicer = slicer_scene.slicer
    volume = oblique_volume()
    write_volume(volume, tmp_path / "ours.nrrd")
    node = slicer_scene.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    slicer_scene.scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "ours.nrrd"))
    assert storage.ReadData(node)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), volume.array)
    np.testing.assert_allclose(ijk_to_ras_of(node), volume.ijk_to_ras, atol=1e-6)


def test_the_modality_a_dicom_series_states_is_kept(tmp_path):
    write_dicom_series(tmp_path / "series", sitk_image())
    assert read_volume(tmp_path / "series").modality == "CT"
    assert read_volume(write_volume(oblique_volume(), tmp_path / "v.nrrd")).modality is None
