"""Our model equals the reference packages given identical weights."""

from __future__ import annotations

import pytest
import torch
from reference_models import random_state_dict, reference_robust_sam, reference_sam

from RobustMedSAMLib.model.config import TINY, VIT_B, ModelConfig
from RobustMedSAMLib.model.sam import ImageFeatures, SegmentAnythingModel

TOL = dict(atol=2e-5, rtol=1e-4)


def _ours(config: ModelConfig, state: dict, robust: bool) -> SegmentAnythingModel:
    model = SegmentAnythingModel(config, robust=robust)
    model.load_state_dict(state, strict=True)
    return model


def _image(config: ModelConfig, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, config.image_size, config.image_size, generator=generator) * 255


def _prompts(config: ModelConfig) -> list[dict]:
    s = config.image_size
    low = config.low_res_size
    return [
        {"point_coords": torch.tensor([[[0.4 * s, 0.5 * s]]]), "point_labels": torch.tensor([[1]])},
        {
            "point_coords": torch.tensor([[[0.4 * s, 0.5 * s], [0.7 * s, 0.2 * s]]]),
            "point_labels": torch.tensor([[1, 0]]),
        },
        {"boxes": torch.tensor([[0.2 * s, 0.3 * s, 0.6 * s, 0.8 * s]])},
        {
            "boxes": torch.tensor([[0.2 * s, 0.3 * s, 0.6 * s, 0.8 * s]]),
            "point_coords": torch.tensor([[[0.4 * s, 0.5 * s]]]),
            "point_labels": torch.tensor([[1]]),
            "mask_inputs": torch.randn(1, 1, low, low, generator=torch.Generator().manual_seed(3)),
        },
    ]


def _decode_ours(model: SegmentAnythingModel, features, prompt: dict, multimask: bool):
    points = None
    if "point_coords" in prompt:
        points = (prompt["point_coords"], prompt["point_labels"])
    return model.decode(
        features, points, prompt.get("boxes"), prompt.get("mask_inputs"), multimask=multimask
    )


def check_plain_sam(config: ModelConfig, state: dict) -> None:
    ours, ref = _ours(config, state, robust=False), reference_sam(config, state)
    x = ref.preprocess(_image(config))
    with torch.no_grad():
        embedding = ref.image_encoder(x)
        features = ours.encode(x)
        torch.testing.assert_close(features.embedding, embedding, **TOL)
        for prompt in _prompts(config):
            for multimask in (True, False):
                points = (
                    (prompt["point_coords"], prompt["point_labels"])
                    if "point_coords" in prompt
                    else None
                )
                sparse, dense = ref.prompt_encoder(
                    points, prompt.get("boxes"), prompt.get("mask_inputs")
                )
                want = ref.mask_decoder(
                    embedding, ref.prompt_encoder.get_dense_pe(), sparse, dense, multimask
                )
                got = _decode_ours(ours, features, prompt, multimask)
                torch.testing.assert_close(got[0], want[0], **TOL)
                torch.testing.assert_close(got[1], want[1], **TOL)


def check_robust_sam(config: ModelConfig, state: dict) -> None:
    """Our robust path against ``robust_segment_anything``: its ``predict`` (encoder +
    robust decoder, as at its inference) for the first prompt, then its decoder on the
    same encoder output for the others (``predict`` re-encodes the image every call)."""
    ours, ref = _ours(config, state, robust=True), reference_robust_sam(config, state)
    image = _image(config)
    x = ref.preprocess(image)
    with torch.no_grad():
        embedding, early = ref.image_encoder(x)
        features = ours.encode(x)
        torch.testing.assert_close(features.embedding, embedding, **TOL)
        first = _prompts(config)[0]
        record = {"image": image, "original_size": (config.image_size,) * 2, **first}
        (want,) = ref.predict(None, [record], multimask_output=False)
        logits, iou = _decode_ours(ours, features, first, False)
        torch.testing.assert_close(logits, want["low_res_logits"], **TOL)
        torch.testing.assert_close(iou, want["iou_predictions"], **TOL)
        for prompt in _prompts(config):
            points = (
                (prompt["point_coords"], prompt["point_labels"])
                if "point_coords" in prompt
                else None
            )
            sparse, dense = ref.prompt_encoder(
                points, prompt.get("boxes"), prompt.get("mask_inputs")
            )
            for multimask in (False, True):
                want_logits, want_iou, _, _ = ref.mask_decoder(
                    embedding, ref.prompt_encoder.get_dense_pe(), sparse, dense, multimask,
                    encoder_features=early[0][None], clear=False,
                )  # fmt: skip
                logits, iou = _decode_ours(ours, features, prompt, multimask)
                n = logits.shape[1]  # reference multimask: first three of its slice
                torch.testing.assert_close(logits, want_logits[:, :n], **TOL)
                torch.testing.assert_close(iou, want_iou[:, :n], **TOL)


def test_plain_sam_equals_segment_anything_tiny(tiny_sam_state):
    check_plain_sam(TINY, tiny_sam_state)


def test_robust_sam_equals_robust_segment_anything_tiny(tiny_robust_state):
    check_robust_sam(TINY, tiny_robust_state)


def test_robust_decoder_changes_output_when_robust_weights_change(tiny_robust_state):
    """The robust modules are on the inference path (not silently skipped)."""
    state = dict(tiny_robust_state)
    state["mask_decoder.robust_mlp.layers.2.bias"] = (
        state["mask_decoder.robust_mlp.layers.2.bias"] + 1
    )
    a, b = _ours(TINY, tiny_robust_state, True), _ours(TINY, state, True)
    x = _image(TINY)
    prompt = _prompts(TINY)[2]
    with torch.no_grad():
        la, _ = _decode_ours(a, a.encode(x), prompt, False)
        lb, _ = _decode_ours(b, b.encode(x), prompt, False)
    assert (la - lb).abs().max() > 1e-3


def test_robust_parameter_count_vit_b():
    """The robust decoder modules hold 63.5 M parameters in ViT-B; SAM's decoder 4.1 M."""
    plain = SegmentAnythingModel(VIT_B, robust=False).mask_decoder
    robust = SegmentAnythingModel(VIT_B, robust=True).mask_decoder
    n_plain = sum(p.numel() for p in plain.parameters())
    n_robust = sum(p.numel() for p in robust.parameters())
    assert round(n_plain / 1e6, 1) == 4.1
    assert round(n_robust / 1e6, 1) == 63.5


@pytest.mark.slow
def test_vit_b_equals_references():
    """Full ViT-B shapes: embeddings and logits equal both reference packages."""
    torch.set_num_threads(2)
    check_plain_sam(VIT_B, random_state_dict(VIT_B, robust=False, seed=5))
    check_robust_sam(VIT_B, random_state_dict(VIT_B, robust=True, seed=6))


def test_cached_first_layer_equals_uncached_and_is_used(tiny_robust_state):
    """A click reads layer 0's image-side projections from the slice's features (layer 0
    projects the image no more) with the logits of computing them per click, for points,
    boxes and a batch of boxes; a mask prompt changes layer 0's input, so it projects."""
    model = _ours(TINY, tiny_robust_state, True)
    s = TINY.image_size
    batch = {"boxes": torch.tensor([[0.2 * s, 0.3 * s, 0.6 * s, 0.8 * s], [0, 0, s / 2, s / 3]])}
    calls = []
    layer = model.mask_decoder.transformer.layers[0].cross_attn_token_to_image
    layer.k_proj.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        cached = model.encode(_image(TINY))
        uncached = ImageFeatures(cached.embedding, cached.robust)
        for prompt in [*_prompts(TINY), batch]:
            for multimask in (False, True):
                want = _decode_ours(model, uncached, prompt, multimask)
                calls.clear()
                got = _decode_ours(model, cached, prompt, multimask)
                torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
                assert len(calls) == ("mask_inputs" in prompt)
