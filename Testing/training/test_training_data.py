"""Training data sources: MedSegBench files, volume folders, phantoms; bad data errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813 - the usual name

from RobustMedSAMLib.datasets.volume_pairs import find_pairs
from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.training.config import CorruptionSection, DataSection, TrainingConfig
from RobustMedSAMLib.training.data import (
    load_data,
    region_masks,
    variant_spec,
)


def _medsegbench(path, n=4, size=32, classes=(1,), rgb=False, **override):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        labels = np.zeros((n, size, size), np.uint8)
        for i in range(n):
            for c in classes:
                labels[i, 4 * c : 4 * c + 8, 6 : 6 + 10 + i] = c
        images = rng.integers(0, 256, (n, size, size, 3) if rgb else (n, size, size), np.uint8)
        arrays[f"{split}_images"], arrays[f"{split}_label"] = images, labels
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def test_medsegbench_file_gives_one_sample_per_image_and_class(tmp_path):
    path = _medsegbench(tmp_path / "demo_32.npz", classes=(1, 2), rgb=True)
    train, val = load_data(DataSection(source="medsegbench", paths=(str(path),), min_foreground=5))
    assert len(train) == 8 and len(val) == 8
    image, mask = train[1]
    assert image.dtype == np.uint8 and image.shape == (32, 32) and mask.dtype == bool
    assert mask.sum() == 8 * 10 and train.names[1].endswith(":0:2")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"val_label": None}, r"missing \['val_label'\]"),
        ({"train_label": np.zeros((4, 16, 16), np.uint8)}, "do not match"),
        ({"train_label": np.zeros((4, 32, 32), np.uint8)}, "every label is empty"),
    ],
)
def test_bad_medsegbench_files_raise_input_error(tmp_path, override, message):
    path = _medsegbench(tmp_path / "bad_32.npz", **override)
    with pytest.raises(InputError, match=message):
        load_data(DataSection(source="medsegbench", paths=(str(path),)))


def test_unreadable_or_missing_data_files_raise_input_error(tmp_path):
    broken = tmp_path / "broken_32.npz"
    broken.write_bytes(b"not a zip file")
    with pytest.raises(InputError, match="not a readable .npz"):
        load_data(DataSection(source="medsegbench", paths=(str(broken),)))
    with pytest.raises(InputError, match="not found"):
        load_data(DataSection(source="medsegbench", paths=(str(tmp_path / "nope.npz"),)))


def _write(array, path):
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))


def test_volume_folder_pairs_sample_foreground_slices_along_the_axis(tmp_path):
    for name in ("a", "b"):
        image = np.random.default_rng(1).normal(0, 100, (6, 20, 24)).astype(np.int16)
        label = np.zeros((6, 20, 24), np.uint8)
        label[2:5, 5:15, 6:18] = 1
        _write(image, tmp_path / f"{name}.nrrd")
        _write(label, tmp_path / f"{name}-label.nrrd")
    assert [p.name for p, _ in find_pairs(tmp_path)] == ["a.nrrd", "b.nrrd"]
    section = DataSection(source="volumes", folder=str(tmp_path), val_fraction=0.5)
    train, val = load_data(section)
    assert len(train) == 3 and len(val) == 3  # slices 2..4 of each volume
    assert train[0][0].shape == (20, 24) and train[0][1].sum() == 10 * 12
    coronal, _ = load_data(dataclasses.replace(section, axis="coronal"))
    assert len(coronal) == 10 and coronal[0][0].shape == (6, 24)


def test_volume_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="no image/label pairs"):
        find_pairs(tmp_path)
    _write(np.zeros((4, 8, 8), np.int16), tmp_path / "a.nrrd")
    _write(np.zeros((4, 8, 9), np.uint8), tmp_path / "a-label.nrrd")
    with pytest.raises(InputError, match="differs from image"):
        load_data(DataSection(source="volumes", folder=str(tmp_path)))
    _write(np.zeros((4, 8, 8), np.uint8), tmp_path / "a-label.nrrd")
    with pytest.raises(InputError, match="empty"):
        load_data(DataSection(source="volumes", folder=str(tmp_path)))


def test_phantom_data_is_seeded_and_split_by_volume():
    section = DataSection(phantom_volumes=3, phantom_shape=(8, 40, 40))
    train, val = load_data(section, seed=1)
    again, _ = load_data(section, seed=1)
    assert len(train) > 0 and len(val) > 0
    assert train.fingerprint() == again.fingerprint()
    assert not {n.split(":")[0] for n in train.names} & {n.split(":")[0] for n in val.names}


def test_corrupted_variants_are_fixed_per_image_and_variant():
    section = CorruptionSection(names=("gaussian_noise", "motion_blur"), severities=(2, 3))
    assert variant_spec(section, 0, 5, 0) is None
    spec = variant_spec(section, 0, 5, 1)
    assert spec == variant_spec(section, 0, 5, 1)
    assert spec[0] in section.names and spec[1] in (2, 3)
    assert {variant_spec(section, 0, i, 1) for i in range(10)} != {spec}


# Automatic region masks -------------------------------------------------------------


def _blobs_image(seed=0):
    """A 128 x 128 scene: a grey body on a black background holding a bright disc and a
    dark square; returns the image and the known (body filled, disc, square) masks."""
    rows, cols = np.mgrid[:128, :128]
    body = ((rows - 64) / 50) ** 2 + ((cols - 64) / 40) ** 2 <= 1
    disc = (rows - 50) ** 2 + (cols - 70) ** 2 <= 12**2
    square = (rows >= 80) & (rows < 96) & (cols >= 45) & (cols < 61)
    image = np.full((128, 128), 10.0)
    image[body], image[disc], image[square] = 120, 220, 50
    image += np.random.default_rng(seed).normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), (body, disc, square)


def _best_iou(masks, truth):
    return max(float((m & truth).sum() / (m | truth).sum()) for m in masks)


def test_region_masks_find_the_objects_of_an_unlabelled_image():
    image, (body, disc, square) = _blobs_image()
    masks = region_masks(image)
    assert 3 <= len(masks) <= 8 and all(m.dtype == bool and m.shape == (128, 128) for m in masks)
    assert _best_iou(masks, disc) > 0.9 and _best_iou(masks, square) > 0.9
    assert _best_iou(masks, body) > 0.9  # the body with its holes filled
    assert all(m.sum() <= 0.6 * m.size for m in masks)  # never the background
    assert len(region_masks(image, limit=2)) == 2


def test_phantom_ct_slices_are_windowed_as_inference_windows_them():
    """Training used the volume's percentiles (about -1024..167 HU on the organ phantom)
    where inference uses the soft-tissue preset for CT (-160..240 HU): the model saw
    other grey levels in training than in use."""
    from RobustMedSAMLib.datasets.phantoms import organ_scene
    from RobustMedSAMLib.inference.preprocessing import resolve_window, window_to_uint8

    section = DataSection(phantom_volumes=1, phantom_shape=(8, 40, 40), val_fraction=0.0)
    train, _ = load_data(section, seed=2)
    phantom = organ_scene(shape=(8, 40, 40), texture="ct", seed=2000)
    window, source = resolve_window(phantom.image)
    assert source == "preset:soft_tissue"
    index = int(train.names[0].split(":")[1])
    assert np.array_equal(train.images[0], window_to_uint8(phantom.image[index], window))


def test_samples_sharing_an_image_share_one_cache_row(tmp_path):
    (tmp_path / "images").mkdir()
    for seed in range(2):
        _write(_blobs_image(seed)[0], tmp_path / "images" / f"scan{seed}.png")
    train, _ = load_data(DataSection(source="regions", folder=str(tmp_path), val_fraction=0.0))
    firsts, rows = train.image_rows()
    assert len(firsts) == 2 and len(rows) == len(train) > 2
    for index, row in enumerate(rows):
        assert train.images[index] is train.images[firsts[row]]


def test_regions_source_reads_a_folder_and_mixes_in_phantoms(tmp_path):
    (tmp_path / "images").mkdir()
    for seed in range(4):
        _write(_blobs_image(seed)[0], tmp_path / "images" / f"scan{seed}.png")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    section = DataSection(source="regions", folder=str(tmp_path), val_fraction=0.25)
    train, val = load_data(section)
    assert len(train) >= 9 and len(val) >= 3
    image, mask = train[0]
    assert image.dtype == np.uint8 and image.shape == (128, 128) and mask.dtype == bool
    assert all(":region" in name for name in train.names + val.names)
    assert not {n.split(":")[0] for n in train.names} & {n.split(":")[0] for n in val.names}
    mixed = dataclasses.replace(section, phantom_mix=4, phantom_shape=(8, 40, 40))
    mixed_train, mixed_val = load_data(mixed)
    assert train.names == mixed_train.names[: len(train)]
    for split in (mixed_train, mixed_val):
        assert any(n.startswith("phantom") for n in split.names)
        assert any(":region" in n for n in split.names)


def test_regions_source_errors_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="no images"):
        load_data(DataSection(source="regions", folder=str(tmp_path)))
    with pytest.raises(InputError, match="not found"):
        load_data(DataSection(source="regions", folder=str(tmp_path / "nope")))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="not a readable image"):
        load_data(DataSection(source="regions", folder=str(tmp_path)))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"source": "regions"}, "needs folder"),
        ({"source": "phantoms", "phantom_mix": 2}, "phantom_volumes instead"),
        ({"source": "regions", "folder": "x", "phantom_mix": -1}, "phantom_mix must be at least 0"),
        ({"source": "regions", "folder": "x", "regions_per_image": 0}, "regions_per_image"),
    ],
)
def test_regions_and_phantom_mix_config_is_checked(data, message):
    values = {"model": {"init": "random"}, "data": data}
    with pytest.raises(InputError, match=message):
        TrainingConfig.from_dict(values)
