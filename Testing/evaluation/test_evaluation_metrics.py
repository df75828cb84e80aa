"""Metrics and the simulated user's prompts, against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.evaluation.metrics import dice, iou, mean_std, per_slice_dice
from RobustMedSAMLib.evaluation.simulated_clicks import (
    correction_point,
)
from RobustMedSAMLib.inference.mask_prompts import deepest_point, mask_box


def test_dice_and_iou_hand_computed():
    prediction = np.zeros((4, 4), bool)
    truth = np.zeros((4, 4), bool)
    prediction[0, :3] = True  # 3 pixels
    truth[0, 1:] = True  # 3 pixels, 2 shared
    assert dice(prediction, truth) == pytest.approx(2 * 2 / 6)
    assert iou(prediction, truth) == pytest.approx(2 / 4)
    assert dice(prediction, ~prediction) == 0.0
    assert dice(truth, truth) == iou(truth, truth) == 1.0


def test_both_empty_is_perfect_and_shapes_must_match():
    empty = np.zeros((3, 3), bool)
    assert dice(empty, empty) == iou(empty, empty) == 1.0
    assert dice(empty, ~empty) == 0.0
    with pytest.raises(InputError, match="shapes differ"):
        dice(empty, np.zeros((3, 4), bool))


def test_per_slice_dice_skips_slices_empty_in_both():
    truth = np.zeros((4, 3, 3), bool)
    prediction = np.zeros_like(truth)
    truth[1, 0, 0] = prediction[1, 0, 0] = True  # perfect slice
    truth[2, :2, 0] = True  # 2 px truth, 1 px predicted inside, 1 outside
    prediction[2, 0, 0] = prediction[2, 2, 2] = True
    assert per_slice_dice(prediction, truth) == [(1, 1.0), (2, pytest.approx(0.5))]
    assert [i for i, _ in per_slice_dice(prediction, truth, axis=2)] == [0, 2]


def test_mean_std():
    assert mean_std([1.0, 3.0]) == (2.0, 1.0)
    assert mean_std([0.5]) == (0.5, 0.0)


def test_interior_point_is_the_deepest_pixel():
    mask = np.zeros((20, 30), bool)
    mask[2:9, 3:10] = True  # 7x7 square, centre (x=6, y=5)
    mask[10:19, 12:29] = True  # 9x17 block: deeper, centre row 14
    x, y = deepest_point(mask)
    assert y == 14 and 16 <= x <= 24
    edge = np.zeros((5, 5), bool)
    edge[:, :2] = True  # touches the image border: the border counts as outside
    assert deepest_point(edge)[0] in (0.0, 1.0)
    with pytest.raises(InputError):
        deepest_point(np.zeros((4, 4), bool))


def test_bounding_box_is_inclusive_xyxy():
    mask = np.zeros((10, 12), bool)
    mask[2:5, 7:11] = True
    assert _inclusive_box(mask) == (7.0, 2.0, 10.0, 4.0)


def test_correction_in_the_largest_miss_is_positive_at_its_centre():
    truth = np.zeros((40, 40), bool)
    truth[5:35, 5:35] = True
    prediction = truth.copy()
    prediction[5:16, 5:35] = False  # miss: 11 x 30 band at the top
    prediction[36:39, 36:39] = True  # false positive: 3 x 3
    click = correction_point(prediction, truth)
    assert (click.label, click.area) == (1, 11 * 30)
    assert click.y == 10.0 and 9 <= click.x <= 30  # the band's middle row
    assert not prediction[int(click.y), int(click.x)] and truth[int(click.y), int(click.x)]


def test_correction_in_the_largest_false_positive_is_negative():
    truth = np.zeros((40, 40), bool)
    truth[10:20, 10:20] = True
    prediction = truth.copy()
    prediction[10, 10] = False  # 1-pixel miss
    prediction[25:36, 25:36] = True  # 11 x 11 false positive, centre (30, 30)
    click = correction_point(prediction, truth)
    assert (click.x, click.y, click.label, click.area) == (30.0, 30.0, 0, 121)


def test_no_correction_when_the_mask_is_perfect():
    truth = np.zeros((8, 8), bool)
    truth[2:5, 2:5] = True
    assert correction_point(truth, truth) is None


def _inclusive_box(mask):
    return tuple(float(v) for v in mask_box(mask))
