"""Decoding B images with B prompt sets (training) gives what decoding each image alone
(inference) gives, for the plain and the robust decoder."""

from __future__ import annotations

import pytest
import torch
from reference_models import random_state_dict

from RobustMedSAMLib.model.config import TINY
from RobustMedSAMLib.model.sam import SegmentAnythingModel
from RobustMedSAMLib.training.decoding import decode_paired
from RobustMedSAMLib.training.simulated_prompts import Prompts


@pytest.mark.parametrize("robust", [False, True], ids=["plain", "robust"])
@pytest.mark.parametrize("multimask", [False, True], ids=["single", "multi"])
def test_paired_equals_one_image_at_a_time(robust, multimask):
    torch.manual_seed(0)
    model = SegmentAnythingModel(TINY, robust=robust).eval()
    model.load_state_dict(random_state_dict(TINY, robust=robust, seed=3))
    images = torch.randn(2, 3, TINY.image_size, TINY.image_size)
    boxes = torch.tensor([[4.0, 6.0, 40.0, 30.0], [10.0, 2.0, 50.0, 60.0]])
    with torch.no_grad():
        features = [model.encode(images[i : i + 1]) for i in range(2)]
        embedding = torch.cat([f.embedding for f in features])
        robust_features = torch.cat([f.robust for f in features]) if robust else None
        logits, iou, _ = decode_paired(
            model, embedding, robust_features, Prompts(None, None, boxes), multimask=multimask
        )
        for i, f in enumerate(features):
            alone, alone_iou = model.decode(f, boxes=boxes[i : i + 1], multimask=multimask)
            expected = alone[0] if multimask else alone[0, 0]
            expected_iou = alone_iou[0] if multimask else alone_iou[0, 0]
            # same float32 operations on the same values, batched: rounding-level agreement
            torch.testing.assert_close(logits[i], expected, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(iou[i], expected_iou, rtol=1e-4, atol=1e-4)
