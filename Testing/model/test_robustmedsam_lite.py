"""RobustMedSAM-Lite's model: LiteMedSAM's encoder + a residual robust decoder that starts
as LiteMedSAM's decoder.

Step-0 tolerance: the untrained robust path adds exact zeros (zeroed last layers) to the
plain decoder's features and hypernetwork outputs, and its token path runs the same
operations on the same weights; what can differ is only the order of float32 sums in the
batched (paired) attention, a few float32 ulps of the largest logit. The bound is 64 ulps
of the largest logit.
"""

from __future__ import annotations

import pytest
import torch

from RobustMedSAMLib.model.config import LITE_ROBUST
from RobustMedSAMLib.model.robust_decoder import RESIDUAL_BRANCH_ENDS
from RobustMedSAMLib.model.sam import SegmentAnythingModel
from RobustMedSAMLib.weights.checkpoint import (
    load_model,
    read_state_dict,
    robust_lite_from_litemedsam,
)
from RobustMedSAMLib.weights.registry import resolve_checkpoint

BOX = torch.tensor([[60.0, 70.0, 190.0, 170.0]])  # model-input pixels
POINT = (torch.tensor([[[120.0, 118.0]]]), torch.tensor([[1]]))


@pytest.fixture(scope="module")
def pair():
    torch.set_flush_denormal(True)
    path = resolve_checkpoint("litemedsam")
    lite = load_model(path, robust=False)
    robust = robust_lite_from_litemedsam(read_state_dict(path), path)
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 256, 256, generator=generator)
    with torch.no_grad():
        return lite, robust, lite.encode(image), robust.encode(image)


def _ulps(reference: torch.Tensor, count: int = 64) -> float:
    return count * float(torch.finfo(torch.float32).eps) * float(reference.abs().max())


@torch.no_grad()
def test_untrained_robust_path_gives_litemedsams_box_masks(pair):
    lite, robust, lite_features, robust_features = pair
    expected, expected_iou = lite.decode(lite_features, boxes=BOX)
    logits, iou = robust.decode(robust_features, boxes=BOX)
    assert robust_features.robust is not None and robust.robust  # the robust path ran
    torch.testing.assert_close(logits, expected, rtol=0, atol=_ulps(expected))
    torch.testing.assert_close(iou, expected_iou, rtol=0, atol=1e-6)


@torch.no_grad()
def test_untrained_robust_path_gives_litemedsams_point_candidates(pair):
    lite, robust, lite_features, robust_features = pair
    expected, _ = lite.decode(lite_features, points=POINT, multimask=True)
    logits, _ = robust.decode(robust_features, points=POINT, multimask=True)
    torch.testing.assert_close(logits, expected, rtol=0, atol=_ulps(expected))


def test_the_robust_branches_start_at_zero_and_can_learn(pair):
    """Zeroed last layers keep the start exact; their gradients are not zero, so the
    branches move at the first step."""
    _, robust, _, features = pair
    decoder = robust.mask_decoder
    for name in RESIDUAL_BRANCH_ENDS:
        assert not decoder.get_submodule(name).weight.any()
    logits, _ = robust.decode(features.to("cpu"), boxes=BOX)
    logits.square().mean().backward()
    grads = [decoder.get_submodule(name).weight.grad for name in RESIDUAL_BRANCH_ENDS[:1]]
    grads.append(decoder.robust_mlp.layers[2].weight.grad)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    robust.zero_grad(set_to_none=True)


def test_the_lite_robust_blocks_read_tinyvit_stage_two_at_their_own_width():
    with torch.device("meta"):
        model = SegmentAnythingModel(LITE_ROBUST, robust=True)
    first = model.mask_decoder.fourier_first_layer_features
    last = model.mask_decoder.fourier_last_layer_features
    assert first.reduce.in_channels == 160 and last.reduce.in_channels == 256
    assert first.reduce.out_channels == LITE_ROBUST.robust_width
    assert first.upsample_layer[3].out_channels == 256 // 8
