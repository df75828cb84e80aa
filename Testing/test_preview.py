"""Robustness preview and contact sheet, with a test double for the predictor."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from RobustMedSAMLib.corruptions import CORRUPTIONS
from RobustMedSAMLib.errors import CancelledError, InputError
from RobustMedSAMLib.phantoms import organ_scene
from RobustMedSAMLib.prediction import Prediction, SlicePrompt
from RobustMedSAMLib.preview import (
    CORRUPTED_OUTLINE,
    contact_sheet,
    dice,
    preview_all,
    preview_corruption,
    write_contact_sheet,
)

SCENE = organ_scene((5, 192, 256), (1.0, 1.0, 3.0), target="aorta", texture="ct", seed=2)
CT_SLICE = SCENE.image[2]  # int16 HU; aorta 260 HU, kidneys 180, everything else <= 125
AORTA = SCENE.mask[2]
ROWS, COLS = CT_SLICE.shape
THRESHOLD = 150
AORTA_POINT = (np.nonzero(AORTA)[1].mean(), np.nonzero(AORTA)[0].mean())  # (x, y) pixels


class ThresholdPredictor:
    """TEST DOUBLE, not a model: the connected region above a threshold that
    contains the first point (4-connectivity), grown by repeated dilation."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.images: list[np.ndarray] = []

    def set_image(self, image: np.ndarray) -> None:
        assert image.ndim == 2
        self.images.append(image)

    def predict(self, prompt: SlicePrompt) -> Prediction:
        above = self.images[-1] >= self.threshold
        x, y = np.rint(prompt.points[0]).astype(int)
        region = np.zeros_like(above)
        region[y, x] = above[y, x]
        while True:
            grown = region.copy()
            grown[1:] |= region[:-1]
            grown[:-1] |= region[1:]
            grown[:, 1:] |= region[:, :-1]
            grown[:, :-1] |= region[:, 1:]
            grown &= above
            if (grown == region).all():
                break
            region = grown
        return Prediction(region, 1.0, np.zeros((1, 256, 256), np.float32))


@pytest.fixture
def prompt():
    return SlicePrompt(points=[AORTA_POINT], labels=[1])


def test_test_double_finds_the_aorta_on_the_clean_slice(prompt):
    predictor = ThresholdPredictor(THRESHOLD)
    predictor.set_image(CT_SLICE)
    assert dice(predictor.predict(prompt).mask, AORTA) > 0.9


def test_preview_reports_masks_and_their_dice(prompt):
    predictor = ThresholdPredictor(THRESHOLD)
    mild = preview_corruption(CT_SLICE, prompt, predictor, "gaussian_noise", 1, spacing=(1, 1))
    heavy = preview_corruption(CT_SLICE, prompt, predictor, "gaussian_noise", 5, spacing=(1, 1))
    for item in (mild, heavy):
        np.testing.assert_array_equal(item.clean, CT_SLICE)
        assert item.corrupted.shape == CT_SLICE.shape and item.corrupted.dtype == np.int16
        assert item.clean_mask.dtype == bool and item.corrupted_mask.shape == CT_SLICE.shape
        assert item.dice == pytest.approx(dice(item.clean_mask, item.corrupted_mask))
    assert mild.dice > 0.99
    assert heavy.dice < mild.dice - 0.1  # heavy noise crosses the threshold


def test_preview_all_segments_the_clean_slice_once(prompt):
    predictor = ThresholdPredictor(THRESHOLD)
    steps = []
    previews = preview_all(CT_SLICE, prompt, predictor, 3, progress=lambda d, t: steps.append(d))
    assert [p.corruption for p in previews] == list(CORRUPTIONS)
    assert len(predictor.images) == 1 + len(CORRUPTIONS)
    assert steps == list(range(1, len(CORRUPTIONS) + 2))
    assert all(0.0 <= p.dice <= 1.0 for p in previews)
    clean_mask = previews[0].clean_mask
    assert all(p.clean_mask is clean_mask for p in previews)


def test_preview_all_can_be_cancelled(prompt):
    stop = threading.Event()
    predictor = ThresholdPredictor(THRESHOLD)
    stop.set()
    with pytest.raises(CancelledError):
        preview_all(CT_SLICE, prompt, predictor, 2, cancel=stop)
    assert len(predictor.images) == 1


def test_contact_sheet_has_a_tile_per_type_with_outlines(prompt, tmp_path):
    previews = preview_all(CT_SLICE, prompt, ThresholdPredictor(THRESHOLD), 4)
    path = write_contact_sheet(previews, tmp_path / "sheet.png", prompt, tile_size=256, columns=4)
    with Image.open(path) as sheet:
        assert sheet.format == "PNG"
        pixels = np.asarray(sheet.convert("RGB"))
    tile_w, tile_h = 256, 192 + 16  # the slice at scale 1 under a caption band
    assert pixels.shape == (4 * tile_h, 4 * tile_w, 3)  # 13 tiles in a 4 x 4 grid
    for index, item in enumerate(previews, start=1):
        r, c = divmod(index, 4)
        tile = pixels[r * tile_h + 16 : (r + 1) * tile_h, c * tile_w : (c + 1) * tile_w]
        yellow = (tile == CORRUPTED_OUTLINE).all(axis=-1)
        if item.corrupted_mask.any():
            assert yellow.sum() >= 8, f"{item.corruption}: mask outline missing"
            assert yellow[item.corrupted_mask].sum() == yellow.sum()  # drawn on the mask
        else:
            assert yellow.sum() == 0
    assert [p.name for p in tmp_path.iterdir()] == ["sheet.png"]


def test_preview_refuses_volumes_and_empty_prompts(prompt):
    predictor = ThresholdPredictor(THRESHOLD)
    with pytest.raises(InputError, match="2D slice"):
        preview_corruption(np.zeros((2, 8, 8)), prompt, predictor, "gaussian_blur", 1)
    with pytest.raises(InputError, match="point or a box"):
        preview_corruption(CT_SLICE, SlicePrompt(), predictor, "gaussian_blur", 1)
    with pytest.raises(InputError, match="no previews"):
        contact_sheet([])


def test_dice():
    a = np.zeros((4, 4), bool)
    b = a.copy()
    assert dice(a, b) == 1.0
    a[0, :2] = True
    assert dice(a, b) == 0.0
    b[0, 1:3] = True
    assert dice(a, b) == pytest.approx(0.5)
