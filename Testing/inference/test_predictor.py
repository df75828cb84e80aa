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
from RobustMedSAMLib.model.config import LITE_ROBUST, TINY
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


def _expected_choice(masks, scores, logits, points, labels) -> int:
    """The candidate the rule picks from the reference's outputs: those holding the
    positive points first, then the highest predicted IoU x stability (IoU of the
    masks at logits > 1 and > -1)."""
    stability = (logits > 1).sum((1, 2)) / np.maximum((logits > -1).sum((1, 2)), 1)
    rank = scores * stability
    positive = points.reshape(-1, 2)[labels == 1].round().astype(int)
    holds = np.array([all(m[y, x] for x, y in positive) for m in masks])
    if holds.any():
        rank = np.where(holds, rank, -1.0)
    return int(np.argmax(rank))


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
        best = _expected_choice(masks, scores, logits, np.asarray(points), np.asarray(labels))
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


@pytest.mark.parametrize("config, robust", [(TINY, False), (TINY, True), (LITE_ROBUST, True)])
def test_the_size_of_a_slices_features_is_known_before_encoding(config, robust):
    """What the server reserves for a session's embeddings rests on it."""
    predictor = Predictor(SegmentAnythingModel(config, robust=robust))
    expected = predictor.encoded_nbytes((40, 70))
    assert predictor.encode(np.zeros((40, 70)), (0.0, 1.0)).features.nbytes == expected


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


def _three_candidates(model, logits: torch.Tensor, scores: list[float]):
    """Make ``model.decode`` answer with fixed candidates (``1 x 3 x 64 x 64`` logits)."""
    model.decode = lambda *args, **kwargs: (logits, torch.tensor([scores]))


def _disc_logits(centre, radius, sharpness=20.0, size=64) -> torch.Tensor:
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    distance = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2).float().sqrt()
    return (radius - distance) * sharpness


def test_a_point_on_an_edge_picks_the_candidate_holding_it(tiny_sam_state, slice_u8):
    model = _model(tiny_sam_state, robust=False)
    ours = Predictor(model, preprocessing="medsam")
    ours.set_image(slice_u8, window=(0, 255))
    # candidate 0 scores highest but lies beside the point; candidate 1 holds it
    logits = torch.stack([_disc_logits((20, 32), 8), _disc_logits((38, 32), 10)])
    _three_candidates(model, torch.cat([logits, logits[:1]])[None], [0.95, 0.7, 0.5])
    point_x = 38 * 240 / 64  # the second disc's centre column in slice pixels
    result = ours.predict(SlicePrompt(points=[[point_x, 90.0]], labels=[1]))
    assert result.mask[90, int(point_x)] and result.score == pytest.approx(0.7)


def test_of_equal_candidates_the_stable_one_wins(tiny_sam_state, slice_u8):
    model = _model(tiny_sam_state, robust=False)
    ours = Predictor(model, preprocessing="medsam")
    ours.set_image(slice_u8, window=(0, 255))
    blurry = _disc_logits((32, 32), 10, sharpness=0.2)  # edge spread over +-5 px
    sharp = _disc_logits((32, 32), 9, sharpness=20.0)
    _three_candidates(model, torch.stack([blurry, sharp, blurry])[None], [0.8, 0.78, 0.8])
    result = ours.predict(SlicePrompt(points=[[120.0, 90.0]], labels=[1]))
    assert result.score == pytest.approx(0.78) and result.stability > 0.9


def test_grid_cover_places_a_mask_where_the_slice_lies_in_the_model_input():
    """LiteMedSAM pads a 100 x 50 slice's resized 256 x 128 on the right: a mask over the
    slice's right half covers the embedding's columns 16-31 of 64, none of the pad."""
    from RobustMedSAMLib.inference.preprocessing import Frame, Preprocessor

    lite = Preprocessor("litemedsam", 256, (0, 0, 0), (1, 1, 1))
    right = np.zeros((100, 50), bool)
    right[:, 25:] = True
    _, frame = lite.image(np.zeros((100, 50), np.uint8))
    cover = lite.grid_cover(np.stack([right, np.ones_like(right)]), frame, (64, 64)).numpy()
    assert np.allclose(cover[0][:, 17:32], 1) and np.allclose(cover[0][:, :15], 0)
    assert cover[0].sum() == pytest.approx(0.25 * 64 * 64, rel=0.01)  # half of half the grid
    assert np.allclose(cover[1][:, :32], 1) and np.allclose(cover[1][:, 32:], 0)
    medsam = Preprocessor("medsam", 256, (0, 0, 0), (1, 1, 1))  # stretched: no pad
    stretched = medsam.grid_cover(right[None], Frame((100, 50), (256, 256)), (64, 64)).numpy()
    assert np.allclose(stretched[0][:, 33:], 1) and np.allclose(stretched[0][:, :31], 0)
