"""The first prompt's jitter: a user-like box or point drawn from the seed, so that
seeds vary the prompt as well as the corruption."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.evaluation.interactive import first_prompt
from RobustMedSAMLib.evaluation.matrix import CLEAN, MatrixOptions, conditions


def _truth(shape=(64, 80), rows=(20, 40), cols=(10, 60)) -> np.ndarray:
    truth = np.zeros(shape, bool)
    truth[rows[0] : rows[1], cols[0] : cols[1]] = True
    return truth


def test_no_jitter_is_the_tight_box_and_the_deepest_point():
    truth = _truth()
    assert first_prompt(truth, "box").box.tolist() == [10, 20, 59, 39]
    point = first_prompt(truth, "point", 0.0, seed=5).points[0]
    assert tuple(point) == (19.0, 29.0)  # the first of the deepest pixels, any seed


def test_jittered_box_moves_each_side_within_the_bound_and_follows_the_seed():
    truth = _truth()  # 50 px wide, 20 px high
    boxes = [first_prompt(truth, "box", 0.1, seed).box for seed in range(20)]
    shift = np.abs(np.array(boxes) - [10, 20, 59, 39])
    assert (shift[:, [0, 2]] <= 5).all() and (shift[:, [1, 3]] <= 2).all()
    assert shift.max() == 5 and len({tuple(b) for b in boxes}) > 10
    assert np.array_equal(first_prompt(truth, "box", 0.1, 3).box, boxes[3])  # reproducible


def test_jittered_box_stays_on_the_slice():
    truth = _truth(rows=(0, 30), cols=(0, 80))  # touches three edges
    for seed in range(20):
        x0, y0, x1, y1 = first_prompt(truth, "box", 0.3, seed).box
        assert 0 <= x0 <= x1 <= 79 and 0 <= y0 <= y1 <= 63


def test_jittered_point_is_in_the_objects_core():
    truth = _truth()
    depth = ndimage.distance_transform_edt(np.pad(truth, 1))[1:-1, 1:-1]
    points = {tuple(first_prompt(truth, "point", 0.1, seed).points[0]) for seed in range(10)}
    assert len(points) > 5
    for x, y in points:
        assert depth[int(y), int(x)] >= depth.max() / 2


def test_negative_jitter_is_refused():
    with pytest.raises(InputError, match="jitter"):
        first_prompt(_truth(), "box", -0.1)
    with pytest.raises(InputError, match="jitter"):
        MatrixOptions(prompt_jitter=2.0).validate()


def test_with_jitter_clean_and_deterministic_types_run_every_seed():
    names = (CLEAN, "gaussian_blur", "gaussian_noise")
    plain = conditions(MatrixOptions(corruptions=names, severities=(3,), seeds=(0, 1, 2)))
    jittered = conditions(
        MatrixOptions(corruptions=names, severities=(3,), seeds=(0, 1, 2), prompt_jitter=0.1)
    )
    count = lambda conds, name: sum(c.corruption == name for c in conds)  # noqa: E731
    assert [count(plain, n) for n in names] == [1, 1, 3]
    assert [count(jittered, n) for n in names] == [3, 3, 3]
