"""Mask -> box and point: one function each, with both box conventions named."""

from __future__ import annotations

import numpy as np
import pytest

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.inference.mask_prompts import deepest_point, mask_box


def test_box_conventions_differ_by_one_pixel_at_the_far_corner():
    mask = np.zeros((12, 16), bool)
    mask[2:5, 7:11] = True  # rows 2..4, cols 7..10
    np.testing.assert_array_equal(mask_box(mask), [7, 2, 10, 4])
    np.testing.assert_array_equal(mask_box(mask, corners="edges"), [7, 2, 11, 5])


def test_box_extension_is_clipped_to_the_slice():
    mask = np.zeros((10, 10), bool)
    mask[0:4, 6:10] = True
    np.testing.assert_array_equal(mask_box(mask, extension=0.5), [4, 0, 9, 5])


@pytest.mark.parametrize("function", [mask_box, deepest_point])
def test_an_empty_mask_is_a_clear_error(function):
    with pytest.raises(InputError, match="non-empty 2D mask"):
        function(np.zeros((4, 4), bool))


def test_deepest_point_is_inside_the_mask():
    mask = np.zeros((9, 9), bool)
    mask[1:8, 2:7] = True
    x, y = deepest_point(mask)
    assert x == 4.0 and 3.0 <= y <= 5.0  # 3 px from the left and right edges
    assert mask[int(y), int(x)]
