"""Keeping the starting model's box behaviour while a run learns points: a smaller
learning rate on the box path, distillation toward the starting decoder, and the
clean-margin selection rule (micro models on phantoms, CPU, seconds)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.model.config import TINY
from RobustMedSAMLib.model.sam import SegmentAnythingModel
from RobustMedSAMLib.training.config import TrainingConfig
from RobustMedSAMLib.training.runner import BOX_PATH, RunOptions, selection_score, train
from RobustMedSAMLib.weights.checkpoint import read_state_dict, save_state_dict

MICRO = dataclasses.replace(
    TINY, image_size=128, window_size=4, encoder_depth=2, encoder_global_attn_indexes=(1,)
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def checkpoint(folder: Path, robust: bool) -> Path:
    torch.manual_seed(0)
    model = SegmentAnythingModel(MICRO, robust=robust)
    return save_state_dict(model.state_dict(), folder / f"micro-{robust}.safetensors", MICRO)


def config(path: Path, robust: bool = True, **sections) -> TrainingConfig:
    values = {
        "model": {"checkpoint": str(path), "robust": robust},
        "train": {
            "steps": 4,
            "batch_size": 4,
            "lr": 0.001,
            "val_every": 100,
            "weight_decay": 0.0,
        },  # fmt: skip
        "data": {"phantom_volumes": 3, "phantom_shape": [10, 48, 48], "val_samples": 8},
        "corruption": {"variants": 1},
        "prompts": {"corrections": 0, "box_probability": 0.5, "multimask": True},
    }
    for name, overrides in sections.items():
        values[name] = {**values.get(name, {}), **overrides}
    return TrainingConfig.from_dict(values)


def changed(before: dict, after: dict) -> set[str]:
    return {
        k for k in after if k.startswith("mask_decoder.") and not torch.equal(before[k], after[k])
    }


def test_zero_base_lr_scale_freezes_the_box_path_only(tmp_path):
    path = checkpoint(tmp_path, robust=True)
    cfg = config(path, train={"base_lr_scale": 0.0})
    train(cfg, tmp_path / "run", RunOptions(emit=lambda r: None))
    moved = changed(read_state_dict(path), load_file(str(tmp_path / "run" / "last.safetensors")))
    box_path = tuple(f"mask_decoder.{p}" for p in BOX_PATH)
    assert moved and not {k for k in moved if k.startswith(box_path)}
    assert any(k.startswith("mask_decoder.iou_prediction_head.") for k in moved)


def test_distillation_pulls_toward_the_starting_decoder_on_the_clean_image(tmp_path):
    """Distillation alone on clean images of the starting model has a zero gradient (the
    teacher is the starting decoder): nothing moves. With corrupted images it moves."""
    path = checkpoint(tmp_path, robust=False)  # no BatchNorm: train mode = eval mode
    only = {"dice": 0.0, "bce": 0.0, "iou": 0.0, "align": 0.0, "distill": 1.0}
    boxes = {"box_probability": 1.0, "corrections": 0}
    clean = config(path, False, loss=only, prompts=boxes, corruption={"variants": 0})
    train(clean, tmp_path / "clean", RunOptions(emit=lambda r: None))
    before = read_state_dict(path)
    assert not changed(before, load_file(str(tmp_path / "clean" / "last.safetensors")))
    noisy = config(path, False, loss=only, prompts=boxes,
                   corruption={"variants": 1, "clean_fraction": 0.0})  # fmt: skip
    records: list[dict] = []
    train(noisy, tmp_path / "noisy", RunOptions(emit=records.append))
    assert changed(before, load_file(str(tmp_path / "noisy" / "last.safetensors")))
    assert all(r["losses"]["distill"] > 0 for r in records if r["event"] == "step")


def test_selection_score_refuses_a_clean_drop_beyond_the_margin():
    base = {"val_dice_clean": 0.90, "val_dice": 0.80, "val_point_dice": 0.0}
    kept = {"val_dice_clean": 0.895, "val_dice": 0.82, "val_point_dice": 0.5}
    lost = {"val_dice_clean": 0.85, "val_dice": 0.88, "val_point_dice": 0.7}
    assert selection_score(kept, base, 0.01) == pytest.approx(1.32)
    assert selection_score(lost, base, 0.01) == -1.0
    assert selection_score(base, base, 0.01) == pytest.approx(0.80)


def test_clean_margin_run_saves_the_checkpoint_the_rule_picks(tmp_path):
    """Step 0 is a candidate; best.safetensors is the validation with the highest
    degraded box + point Dice among those within the margin on clean boxes."""
    path = checkpoint(tmp_path, robust=True)
    cfg = config(path, train={"steps": 6, "val_every": 2, "lr": 0.003, "clean_margin": 0.01})
    records: list[dict] = []
    train(cfg, tmp_path / "run", RunOptions(emit=records.append))
    vals = [r for r in records if r["event"] == "val"]
    assert vals[0]["step"] == 0 and vals[0]["best"]
    scores = [selection_score(v, vals[0], 0.01) for v in vals]
    chosen = max(range(len(vals)), key=lambda i: (scores[i], -i))  # the first of a tie
    assert [v["step"] for v in vals if v["best"]][-1] == vals[chosen]["step"]
    best = load_file(str(tmp_path / "run" / "best.safetensors"))
    if vals[chosen]["step"] == 0:
        start = read_state_dict(path)
        assert not changed(start, best)
    assert (tmp_path / "run" / "best.safetensors").is_file()


def test_out_of_range_lr_scale_is_refused(tmp_path):
    with pytest.raises(InputError, match="train.base_lr_scale"):
        config(tmp_path / "x.safetensors", train={"base_lr_scale": 2.0}).check()
