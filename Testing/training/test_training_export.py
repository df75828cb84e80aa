"""Exporting image/label pairs and fine-tuning configs that the training loader reads."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from RobustMedSAMLib.datasets.phantoms import sphere
from RobustMedSAMLib.datasets.volume_pairs import find_pairs
from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.formats.segmentation import read_segmentation
from RobustMedSAMLib.formats.volume import Volume, read_volume
from RobustMedSAMLib.training.config import TrainingConfig
from RobustMedSAMLib.training.data import load_data
from RobustMedSAMLib.training.export import (
    DECODER_ONLY,
    export_training_pair,
    safe_name,
    write_finetune_config,
)

ROOT = Path(__file__).resolve().parents[2]


def oblique_phantom() -> tuple[Volume, np.ndarray]:
    """A 12 x 40 x 36 CT-like sphere on a rotated, anisotropic grid, and its uint8 labels."""
    phantom = sphere((12, 40, 36), spacing=(0.8, 0.8, 2.5), radius=7.0)
    angle = np.deg2rad(20)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = rotation @ np.diag([0.8, 0.8, 2.5])
    ijk_to_ras[:3, 3] = (-10.0, 25.0, -40.0)
    labels = phantom.mask.astype(np.uint8)
    return Volume(phantom.image, ijk_to_ras, "CT chest"), labels


def test_exported_pair_reads_back_with_geometry_and_feeds_the_loader(tmp_path):
    volume, labels = oblique_phantom()
    image_path, label_path = export_training_pair(volume, labels, tmp_path / "data", "case1")
    assert image_path == tmp_path / "data" / "images" / "case1.nii.gz"
    assert label_path == tmp_path / "data" / "labels" / "case1.nii.gz"
    image_back = read_volume(image_path)
    np.testing.assert_array_equal(image_back.array, volume.array)
    np.testing.assert_allclose(image_back.ijk_to_ras, volume.ijk_to_ras, atol=1e-4)
    labels_back = read_volume(label_path)
    np.testing.assert_array_equal(labels_back.array, labels)
    np.testing.assert_allclose(labels_back.ijk_to_ras, volume.ijk_to_ras, atol=1e-4)
    assert find_pairs(tmp_path / "data") == [(image_path, label_path)]

    config_path = write_finetune_config(
        tmp_path / "runs" / "finetune.toml", data_folder=tmp_path / "data", steps=20
    )
    config = TrainingConfig.from_toml(config_path)
    assert config.data.source == "volumes" and Path(config.data.folder) == tmp_path / "data"
    assert config.train.steps == 20 and config.train.mode == "decoder"
    train, val = load_data(config.data)
    slices_with_object = int(np.count_nonzero(labels.any(axis=(1, 2))))
    assert len(train) + len(val) == slices_with_object  # one volume: its slices are split
    assert train[0][0].shape == (40, 36) and train[0][0].dtype == np.uint8
    assert train[0][1].sum() >= config.data.min_foreground
    assert not [p for p in (tmp_path / "data").rglob(".*")]  # no temporary leftovers


def test_bad_exports_raise_input_error_and_leave_files_alone(tmp_path):
    volume, labels = oblique_phantom()
    folder = tmp_path / "data"
    with pytest.raises(InputError, match="differs from volume"):
        export_training_pair(volume, labels[:, :-1], folder, "a")
    with pytest.raises(InputError, match="empty"):
        export_training_pair(volume, np.zeros_like(labels), folder, "a")
    with pytest.raises(InputError, match="integer labels"):
        export_training_pair(volume, labels.astype(np.float32), folder, "a")
    with pytest.raises(InputError, match="not a plain file name; try 'x_y'"):
        export_training_pair(volume, labels, folder, "x/y")
    assert not folder.exists()
    image_path, label_path = export_training_pair(volume, labels, folder, "a")
    before = label_path.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        export_training_pair(volume, labels * 2, folder, "a")
    assert label_path.read_bytes() == before
    export_training_pair(volume, labels * 2, folder, "a", overwrite=True)
    assert read_segmentation(label_path)[0].max() == 2


def test_a_failed_label_write_changes_neither_file(tmp_path, monkeypatch):
    import RobustMedSAMLib.training.export as export

    volume, labels = oblique_phantom()
    image_path, _ = export_training_pair(volume, labels, tmp_path, "a")
    before = image_path.read_bytes()

    def failing(*args, **kwargs):
        raise InputError("disk trouble")

    monkeypatch.setattr(export, "write_segmentation", failing)
    with pytest.raises(InputError, match="disk trouble"):
        export_training_pair(
            Volume(volume.array + 5, volume.ijk_to_ras), labels, tmp_path, "a", overwrite=True
        )
    assert image_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.rglob("*")) == [
        "a.nii.gz",
        "a.nii.gz",
        "images",
        "labels",
    ]


def test_safe_name_turns_node_names_into_file_names():
    assert safe_name("CT chest: liver (2)") == "CT_chest_liver_2"
    with pytest.raises(InputError):
        safe_name("///")


def test_built_in_base_equals_the_shipped_decoder_only_config():
    shipped = tomllib.loads((ROOT / "configs" / "decoder_only.toml").read_text())
    shipped["data"] = {k: v for k, v in shipped["data"].items() if k not in ("source", "paths")}
    assert shipped == DECODER_ONLY


def test_config_options_and_base_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    from_builtin = TrainingConfig.from_toml(
        write_finetune_config(tmp_path / "a.toml", data_folder=data)
    )
    from_file = TrainingConfig.from_toml(
        write_finetune_config(
            tmp_path / "b.toml", data_folder=data, base=ROOT / "configs" / "decoder_only.toml"
        )
    )
    assert from_builtin == from_file
    checkpoint = tmp_path / "model.safetensors"
    config = TrainingConfig.from_toml(
        write_finetune_config(
            tmp_path / "c.toml",
            data_folder=data,
            base=ROOT / "configs" / "svd_peft.toml",
            steps=30,
            checkpoint=checkpoint,
            device="cpu",
            axis="coronal",
            overrides={"train": {"batch_size": 2}},
        )
    )
    assert config.train.mode == "svd" and config.train.steps == 30
    assert config.train.val_every == 30 and config.train.warmup_steps <= 3
    assert config.model.checkpoint == str(checkpoint) and config.train.device == "cpu"
    assert config.data.axis == "coronal" and config.train.batch_size == 2
    pair = TrainingConfig.from_toml(
        write_finetune_config(
            tmp_path / "d.toml",
            data_folder=data,
            encoder=tmp_path / "e.pth",
            decoder=tmp_path / "d.pth",
        )
    )
    assert (pair.model.checkpoint, pair.model.encoder) == ("", str(tmp_path / "e.pth"))


def test_bad_config_values_are_refused_before_writing(tmp_path):
    target = tmp_path / "x.toml"
    with pytest.raises(InputError, match="train.steps must be at least 1"):
        write_finetune_config(target, data_folder=tmp_path, steps=0)
    with pytest.raises(InputError, match="unknown key"):
        write_finetune_config(target, data_folder=tmp_path, overrides={"train": {"stpes": 3}})
    with pytest.raises(InputError, match="both encoder and decoder"):
        write_finetune_config(target, data_folder=tmp_path, encoder=tmp_path / "e.pth")
    with pytest.raises(InputError, match="base config not found"):
        write_finetune_config(target, data_folder=tmp_path, base=tmp_path / "none.toml")
    assert not target.exists()


def test_exported_data_and_config_train_a_micro_model(tmp_path):
    import dataclasses

    import torch

    from RobustMedSAMLib.model.config import TINY
    from RobustMedSAMLib.model.sam import SegmentAnythingModel
    from RobustMedSAMLib.training.runner import RunOptions, train
    from RobustMedSAMLib.weights.checkpoint import save_state_dict

    micro = dataclasses.replace(
        TINY, image_size=128, window_size=4, encoder_depth=2, encoder_global_attn_indexes=(1,)
    )
    torch.manual_seed(0)
    checkpoint = save_state_dict(
        SegmentAnythingModel(micro, robust=True).state_dict(), tmp_path / "m.safetensors", micro
    )
    for number in range(2):
        volume, labels = oblique_phantom()
        export_training_pair(volume, labels, tmp_path / "data", f"case{number}")
    config_path = write_finetune_config(
        tmp_path / "ft.toml",
        data_folder=tmp_path / "data",
        steps=2,
        checkpoint=checkpoint,
        device="cpu",
        overrides={
            "train": {"batch_size": 2},
            "data": {"max_samples": 4, "val_samples": 2},
            "corruption": {"variants": 1},
            "prompts": {"corrections": 0},
        },
    )
    records = []
    result = train(
        TrainingConfig.from_toml(config_path), tmp_path / "run", RunOptions(emit=records.append)
    )
    assert result.status == "done" and result.model_path.is_file()
    start = records[0]
    assert start["event"] == "start" and start["train_samples"] > 0 and start["val_samples"] > 0
