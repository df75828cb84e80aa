"""One image/label pair finder: each layout it promises, found the same for training
and evaluation."""

from __future__ import annotations

import logging

import pytest

from RobustMedSAMLib.datasets.volume_pairs import find_pairs
from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.evaluation.datasets import load_cases
from RobustMedSAMLib.formats.volume import VOLUME_SUFFIXES, volume_name


def touch(*paths):
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def names(pairs):
    return [(image.name, label.name) for image, label in pairs]


def test_images_and_labels_subfolders(tmp_path):
    touch(tmp_path / "images/a.nii.gz", tmp_path / "images/b.nrrd", tmp_path / "images/notes.txt",
          tmp_path / "labels/a.nii.gz", tmp_path / "labels/b.seg.nrrd")  # fmt: skip
    assert names(find_pairs(tmp_path)) == [("a.nii.gz", "a.nii.gz"), ("b.nrrd", "b.seg.nrrd")]


def test_nnunet_folders_and_channel_suffix(tmp_path):
    touch(tmp_path / "imagesTr/case_001_0000.nii.gz", tmp_path / "labelsTr/case_001.nii.gz")
    assert names(find_pairs(tmp_path)) == [("case_001_0000.nii.gz", "case_001.nii.gz")]


def test_tagged_labels_in_one_folder(tmp_path):
    touch(tmp_path / "a.nrrd", tmp_path / "a-label.nrrd", tmp_path / "b.nii.gz",
          tmp_path / "b_seg.nii.gz", tmp_path / "c.mha", tmp_path / "d.nrrd",
          tmp_path / "d.seg.nrrd")  # fmt: skip
    assert names(find_pairs(tmp_path)) == [
        ("a.nrrd", "a-label.nrrd"),
        ("b.nii.gz", "b_seg.nii.gz"),
        ("d.nrrd", "d.seg.nrrd"),
    ]


def test_an_image_without_label_is_skipped_with_a_warning(tmp_path, caplog):
    touch(tmp_path / "images/a.nrrd", tmp_path / "images/lonely.nrrd", tmp_path / "labels/a.nrrd")
    with caplog.at_level(logging.WARNING):
        assert names(find_pairs(tmp_path)) == [("a.nrrd", "a.nrrd")]
    assert "lonely.nrrd" in caplog.text


@pytest.mark.parametrize("layout", ["empty", "missing"])
def test_no_pairs_is_one_clear_error(tmp_path, layout):
    folder = tmp_path if layout == "empty" else tmp_path / "nowhere"
    with pytest.raises(InputError, match="no image/label pairs|not found"):
        find_pairs(folder)


def test_evaluation_reads_the_same_layouts(tmp_path):
    touch(tmp_path / "a.nrrd", tmp_path / "a-label.nrrd")
    with pytest.raises(InputError):  # found as a pair, then refused as an empty file
        list(load_cases(f"pairs:{tmp_path}"))


def test_volume_name_strips_every_volume_suffix():
    for suffix in VOLUME_SUFFIXES:
        assert volume_name(f"scan{suffix}") == "scan"
        assert volume_name(f"scan.seg{suffix.upper()}") == "scan"
    assert volume_name("series_folder") == "series_folder"
