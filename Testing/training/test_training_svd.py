"""SVD fine-tuning: exact at start, merged model equals the unmerged one."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from RobustMedSAMLib.model.config import TINY
from RobustMedSAMLib.model.sam import SegmentAnythingModel
from RobustMedSAMLib.training.checkpointing import inference_state
from RobustMedSAMLib.training.svd import SvdLinear, adapter_state, apply_svd, merge_svd

MICRO = dataclasses.replace(
    TINY, image_size=128, window_size=4, encoder_depth=2, encoder_global_attn_indexes=(1,)
)


def _model() -> SegmentAnythingModel:
    torch.manual_seed(3)
    return SegmentAnythingModel(MICRO, robust=True)


def _encode(model: SegmentAnythingModel) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.image_encoder.forward_with_early(image)


def test_untrained_svd_layers_compute_the_original_model():
    model = _model()
    reference = _encode(model)
    replaced = apply_svd(model.image_encoder, ("qkv", "proj", "lin1", "lin2"), rank=0)
    assert len(replaced) == 4 * MICRO.encoder_depth
    for got, want in zip(_encode(model), reference, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_merged_model_equals_unmerged_and_keeps_parameter_names():
    model = _model()
    names = set(model.state_dict())
    apply_svd(model.image_encoder, ("qkv", "lin1"), rank=3)
    for module in model.modules():
        if isinstance(module, SvdLinear):
            assert module.svd_delta.shape == (3,)
            module.svd_delta.data.normal_(0, 0.5)
    unmerged = _encode(model)
    exported = inference_state(model)
    assert set(exported) == names
    adapter = adapter_state(model)
    assert len(adapter) == 2 * MICRO.encoder_depth
    merged = copy.deepcopy(model)
    assert merge_svd(merged) == 2 * MICRO.encoder_depth
    assert not any(isinstance(m, SvdLinear) for m in merged.modules())
    assert set(merged.state_dict()) == names
    for got, want in zip(_encode(merged), unmerged, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    fresh = _model()
    fresh.load_state_dict(exported)
    for got, want in zip(_encode(fresh), unmerged, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    changed = _encode(_model())
    assert not torch.allclose(changed[0], unmerged[0], atol=1e-3)


def test_only_singular_values_receive_gradients():
    layer = nn.Linear(8, 6)
    svd = SvdLinear(layer, rank=2)
    svd(torch.randn(4, 8)).square().sum().backward()
    assert svd.svd_delta.grad is not None and svd.svd_delta.grad.abs().sum() > 0
    assert not svd.weight.requires_grad and svd.weight.grad is None
