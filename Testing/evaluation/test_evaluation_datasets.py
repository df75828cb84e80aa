"""Evaluation data: MedSegBench .npz files, image/label folders, phantoms, specs."""

from __future__ import annotations

import numpy as np
import pytest
from doubles import ThresholdPredictor

from RobustMedSAMLib.datasets.phantoms import sphere
from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.evaluation.datasets import load_cases, parse_data_spec
from RobustMedSAMLib.evaluation.matrix import MatrixOptions, run_matrix
from RobustMedSAMLib.evaluation.models import ModelEntry, parse_model_spec
from RobustMedSAMLib.formats.volume import Volume, write_volume


def medsegbench_file(folder, rgb: bool = True):
    """A small file in MedSegBench's layout: 3 test images, two label classes."""
    rng = np.random.default_rng(0)
    n, size = 3, 40
    labels = np.zeros((n, size, size), np.uint8)
    labels[:, 5:15, 5:15] = 1
    labels[:2, 22:34, 20:36] = 2  # class 2 only on the first two images
    grey = (20 + 180 * (labels > 0) + rng.integers(0, 20, labels.shape)).astype(np.uint8)
    images = np.repeat(grey[..., None], 3, axis=-1) if rgb else grey
    path = folder / "toybench_256.npz"
    empty = np.zeros((0, size, size), np.uint8)
    np.savez(
        path, train_images=empty, train_label=empty, val_images=empty, val_label=empty,
        test_images=images, test_label=labels,
    )  # fmt: skip
    return path, grey


def test_medsegbench_cases_one_per_image_and_label(tmp_path):
    path, grey = medsegbench_file(tmp_path)
    cases = load_cases(f"npz:{path},modality=US")
    assert [c.case for c in cases] == [
        "test00000_l1", "test00000_l2", "test00001_l1", "test00001_l2", "test00002_l1",
    ]  # fmt: skip
    first = cases[0]
    assert (first.dataset, first.modality, first.window) == ("toybench", "US", (0.0, 255.0))
    assert first.image.shape == (40, 40) and not first.is_3d
    np.testing.assert_allclose(first.image, grey[0])  # RGB -> grey
    assert first.mask.sum() == 100 and cases[1].mask.sum() == 12 * 16
    assert len(load_cases(f"npz:{path},limit=1")) == 2
    merged = load_cases(f"npz:{path},labels=any")
    assert [c.case for c in merged] == ["test00000_lany", "test00001_lany", "test00002_lany"]
    assert merged[0].mask.sum() == 100 + 12 * 16


def test_medsegbench_errors_are_clear(tmp_path):
    path, _ = medsegbench_file(tmp_path)
    with pytest.raises(InputError, match="unknown split"):
        load_cases(f"npz:{path},split=dev")
    np.savez(tmp_path / "other.npz", images=np.zeros((1, 4, 4)))
    with pytest.raises(InputError, match="MedSegBench"):
        load_cases(f"npz:{tmp_path / 'other.npz'}")
    with pytest.raises(InputError, match="not found"):
        load_cases(f"npz:{tmp_path / 'none.npz'}")
    with pytest.raises(InputError, match="bad data spec"):
        parse_data_spec("folder/data.npz")
    with pytest.raises(InputError, match="key=value"):
        parse_data_spec("phantom:all,count")


def test_image_label_folder_pairs(tmp_path):
    phantom = sphere((20, 24, 24), radius=6.0)
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    labels = phantom.mask.astype(np.uint8) * 3
    write_volume(Volume(phantom.image, phantom.ijk_to_ras), tmp_path / "imagesTr/a_0000.nii.gz")
    write_volume(Volume(labels, phantom.ijk_to_ras), tmp_path / "labelsTr/a.nii.gz")
    (case,) = load_cases(f"pairs:{tmp_path},modality=CT")
    assert case.is_3d and case.case == "a_l3" and case.modality == "CT"
    np.testing.assert_array_equal(case.mask, phantom.mask)
    with pytest.raises(InputError, match="images/ and labels/"):
        load_cases(f"pairs:{tmp_path / 'imagesTr'}")


def test_2d_matrix_on_medsegbench_with_threshold_double(tmp_path):
    path, _ = medsegbench_file(tmp_path, rgb=False)
    options = MatrixOptions(corruptions=("clean", "gaussian_noise"), severities=(1,), seeds=(0,))
    entry = ModelEntry("threshold", lambda: ThresholdPredictor(110.0))
    result = run_matrix([entry], load_cases(f"npz:{path}"), tmp_path / "out", options)
    assert result.computed == 5 * 2 * 2  # cases x conditions x first prompts; no 3D protocol
    rows = (tmp_path / "out/results.csv").read_text().splitlines()
    clean_box = [r for r in rows if ",interactive,box,,clean," in r and ",dice,0," in r]
    assert len(clean_box) == 5 and all(float(r.split(",")[12]) > 0.95 for r in clean_box)


def test_model_specs():
    spec = parse_model_spec("fused_ft=fused:runs/best.pth")
    assert (spec.label, spec.name, str(spec.checkpoint)) == ("fused_ft", "fused", "runs/best.pth")
    parts = parse_model_spec("fused:medsam.pth+robust.pth")
    assert (str(parts.encoder), str(parts.decoder)) == ("medsam.pth", "robust.pth")
    assert parse_model_spec("sam").label == "sam"
    with pytest.raises(InputError, match="NAME must be one of"):
        parse_model_spec("gpt:model.pth")
