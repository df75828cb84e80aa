"""LiteMedSAM as the base model of a decoder-only fine-tuning run (a few steps)."""

from __future__ import annotations

import pytest
import torch

from RobustMedSAMLib.training.config import TrainingConfig
from RobustMedSAMLib.training.runner import RunOptions, train
from RobustMedSAMLib.weights.checkpoint import load_model, read_state_dict
from RobustMedSAMLib.weights.registry import resolve_checkpoint


@pytest.mark.slow  # about 10 LiteMedSAM encoder passes (~20 s on 2 idle cores)
def test_decoder_finetuning_from_litemedsam_keeps_its_encoder(tmp_path):
    config = TrainingConfig.from_dict(
        {
            "model": {"checkpoint": "litemedsam", "robust": False, "preprocessing": "litemedsam"},
            "train": {"mode": "decoder", "steps": 2, "batch_size": 2, "lr": 1e-3},
            "data": {"phantom_volumes": 1, "phantom_shape": [3, 48, 48], "val_samples": 1},
            "corruption": {"variants": 1},
        }
    )
    result = train(config, tmp_path / "run", RunOptions(emit=lambda record: None))
    assert result.status == "done" and result.step == 2
    tuned = load_model(result.model_path, robust=False)  # the LiteMedSAM layout, strictly
    base = read_state_dict(resolve_checkpoint("litemedsam"))
    state = tuned.state_dict()
    encoder = [k for k in base if k.startswith("image_encoder.") and base[k].is_floating_point()]
    assert all(torch.equal(state[k], base[k]) for k in encoder)
    decoder = [k for k in base if k.startswith("mask_decoder.")]
    assert any(not torch.equal(state[k], base[k]) for k in decoder)
