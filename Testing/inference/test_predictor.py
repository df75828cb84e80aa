"""The predictor gives SamPredictor's masks with SAM preprocessing, MedSAM's with MedSAM's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference_models import reference_sam

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.inference.predictor import Predictor
from RobustMedSAMLib.inference.types import SlicePrompt
from RobustMedSAMLib.model.config import TINY
from RobustMedSAMLib.model.sam import SegmentAnythingModel


def _model(state: dict, robust: bool) -> SegmentAnythingModel:
    model = SegmentAnythingModel(TINY, robust=robust)
    model.load_state_dict(state)
    return model


@pytest.fixture
def slice_u8() -> np.ndarray:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 60, size=(180, 240)).astype(np.uint8)
    image[60:120, 80:170] += 150
    return image


def test_sam_preprocessing_equals_sam_predictor(tiny_sam_state, slice_u8):
    from segment_anything import SamPredictor

    reference = SamPredictor(reference_sam(TINY, tiny_sam_state))
    reference.set_image(np.repeat(slice_u8[:, :, None], 3, axis=2))
    ours = Predictor(_model(tiny_sam_state, robust=False), preprocessing="sam")
    ours.set_image(slice_u8, window=(0, 255))
    for points, labels, box in [
        ([[120.0, 90.0]], [1], None),
        ([[120.0, 90.0], [30.0, 20.0]], [1, 0], None),
        (np.zeros((0, 2)), [], [80, 60, 170, 120]),
    ]:
        pts = np.asarray(points, np.float32) if len(points) else None
        masks, scores, logits = reference.predict(
            pts,
            np.asarray(labels) if len(labels) else None,
            np.asarray(box) if box else None,
            multimask_output=len(labels) == 1 and box is None,
        )
        result = ours.predict(SlicePrompt(points=points, labels=labels, box=box))
        best = int(np.argmax(scores))
        assert result.score == pytest.approx(float(scores[best]), abs=1e-5)
        np.testing.assert_allclose(result.low_res_logits[0], logits[best], atol=1e-4)
        assert (result.mask != masks[best]).mean() < 1e-3  # boundary pixels at float tolerance


def test_medsam_preprocessing_matches_medsam_recipe(tiny_sam_state, slice_u8):
    """MedSAM: resize to S x S, min-max to [0, 1], no mean/std; box scaled per axis; logits
    resized straight to the slice."""
    model = _model(tiny_sam_state, robust=False)
    ours = Predictor(model, preprocessing="medsam")
    ours.set_image(slice_u8, window=(0, 255))
    box = np.array([80, 60, 170, 120], np.float32)
    result = ours.predict(SlicePrompt(box=box))

    rgb = torch.as_tensor(np.repeat(slice_u8[None], 3, 0))[None].float()
    image = F.interpolate(rgb, (256, 256), mode="bicubic", antialias=True).clamp(0, 255).round()
    image = (image - image.min()) / (image.max() - image.min())
    scale = np.array([256 / 240, 256 / 180, 256 / 240, 256 / 180], np.float32)
    with torch.no_grad():
        embedding = model.image_encoder(image)
        sparse, dense = model.prompt_encoder(None, torch.as_tensor(box * scale)[None], None)
        low, iou = model.mask_decoder(
            embedding, model.prompt_encoder.get_dense_pe(), sparse, dense, False
        )
    full = F.interpolate(low, (180, 240), mode="bilinear", align_corners=False)[0, 0] > 0
    assert result.score == pytest.approx(float(iou[0, 0]), abs=1e-5)
    assert (result.mask == full.numpy()).mean() > 0.999


def test_robust_model_predicts_on_any_slice_size(tiny_robust_state):
    predictor = Predictor(_model(tiny_robust_state, robust=True), preprocessing="medsam")
    image = np.random.default_rng(1).normal(40, 30, size=(97, 311)).astype(np.float32)
    predictor.set_image(image)
    result = predictor.predict(SlicePrompt(points=[[150, 40]], labels=[1]))
    assert result.mask.shape == (97, 311) and result.mask.dtype == bool
    assert result.low_res_logits.shape == (1, 64, 64)
    again = predictor.predict(
        SlicePrompt(points=[[150, 40]], labels=[1], mask_input=result.low_res_logits)
    )
    assert again.mask.shape == (97, 311)


def test_errors_are_clear(tiny_sam_state):
    predictor = Predictor(_model(tiny_sam_state, robust=False))
    with pytest.raises(InputError, match="call set_image"):
        predictor.predict(SlicePrompt(points=[[1, 1]], labels=[1]))
    predictor.set_image(np.zeros((32, 32)))  # constant slice: no NaN, still works
    with pytest.raises(InputError, match="empty prompt"):
        predictor.predict(SlicePrompt())
    with pytest.raises(InputError, match="2D slice"):
        predictor.set_image(np.zeros((2, 32, 32)))
    with pytest.raises(InputError, match="mask_input must be 1x64x64"):
        predictor.predict(
            SlicePrompt(points=[[1, 1]], labels=[1], mask_input=np.zeros((1, 256, 256)))
        )
    with pytest.raises(InputError, match="one label per point"):
        SlicePrompt(points=[[1, 1], [2, 2]], labels=[1])
