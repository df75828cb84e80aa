"""A box drawn on a slice is grown by ``SegmentOptions.seed_box_growth`` before the
model is first asked: a box drawn 10 % inside the structure then holds all of it. Only
the user's flat box is grown: a 3D ROI bounds the result, and the point search's box
already carries its margin."""

from __future__ import annotations

import numpy as np
import pytest
from doubles import BoxBlobPredictor, KeepsBoxes
from volumes import organ, truth_box

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.evaluation.metrics import dice
from RobustMedSAMLib.formats.volume import Volume
from RobustMedSAMLib.inference.segment_volume import (
    SegmentOptions,
    VolumePrompts,
    run_record,
    segment_volume,
)
from RobustMedSAMLib.inference.session import SegmentationSession
from RobustMedSAMLib.inference.slicing import ijk_box_roi, slice_box_roi


class AskedBoxes(KeepsBoxes, BoxBlobPredictor):
    """The box-only double, keeping the box of every ask."""


def _centre(truth: np.ndarray) -> int:
    return int(np.flatnonzero(truth.any(axis=(1, 2))).mean().round())


def _run(volume: Volume, prompts: VolumePrompts, growth: float):
    predictor = AskedBoxes(115.0)
    session = SegmentationSession(volume, predictor, window=(-160, 240))
    options = SegmentOptions(propagate=True, zoom=False, seed_box_growth=growth)
    return segment_volume(session, prompts, options), predictor, options


def test_a_box_drawn_too_small_is_grown_before_the_first_ask():
    volume, truth = organ()
    index = _centre(truth)
    roi = VolumePrompts(roi=slice_box_roi(volume, 0, index, truth_box(truth, index, -0.1)))
    before, asked_before, _ = _run(volume, roi, 0.0)
    after, asked, options = _run(volume, roi, 0.15)
    drawn = np.array(asked_before.boxes[0])  # the ROI's box: the drawn one, half a voxel out
    width, height = drawn[2] - drawn[0], drawn[3] - drawn[1]
    expected = drawn + 0.15 * np.array([-width, -height, width, height])
    assert asked.boxes[0].tolist() == pytest.approx(expected.tolist(), abs=1e-3)
    assert after.decisions.grown == [pytest.approx(expected.tolist(), abs=1e-3)]
    assert after.decisions.seed_box_growth == 0.15
    assert before.decisions.grown == [] and before.decisions.seed_box_growth == 0.0
    # the model draws only what the box holds: cut on the seed slice before, whole after
    assert dice(before.mask[index], truth[index]) < 0.93
    assert dice(after.mask[index], truth[index]) > 0.97
    assert dice(after.mask, truth) > dice(before.mask, truth)
    record = run_record(after, roi, options, {}, {})
    assert record["options"]["seed_box_growth"] == 0.15
    assert record["decisions"]["grown"] == after.decisions.grown


def test_the_grown_box_is_cut_to_the_slice():
    volume, truth = organ(centre=(47.5, 26.0, 23.0))  # near the slice's first rows
    index = _centre(truth)
    rows, cols = np.nonzero(truth[index])
    box = np.array([cols.min(), rows.min(), cols.max(), rows.max()])
    assert box[1] < 10  # the box's top is within 10 px of the slice's edge
    roi = VolumePrompts(roi=slice_box_roi(volume, 0, index, box))
    result, asked, _ = _run(volume, roi, 0.2)
    x0, y0, x1, y1 = asked.boxes[0]
    drawn = box + np.array([-0.5, -0.5, 0.5, 0.5])  # the ROI's box: half a voxel out
    width, height = drawn[2] - drawn[0], drawn[3] - drawn[1]
    assert y0 == 0.0  # 0.2 x height above the top would be outside the slice
    assert (x0, x1, y1) == pytest.approx(
        (drawn[0] - 0.2 * width, drawn[2] + 0.2 * width, drawn[3] + 0.2 * height), abs=1e-3
    )
    assert result.decisions.grown[0] == pytest.approx(asked.boxes[0])
    assert dice(result.mask[index], truth[index]) > 0.95


def test_a_3d_roi_and_the_point_search_box_are_not_grown():
    volume, truth = organ()
    filled = np.argwhere(truth)
    low, high = filled.min(axis=0)[::-1] - 0.5, filled.max(axis=0)[::-1] + 0.5
    thick = VolumePrompts(roi=ijk_box_roi(volume, low, high))
    result, _, _ = _run(volume, thick, 0.2)
    assert result.decisions.roi == "3d" and result.decisions.grown == []
    centre = volume.ijk_to_ras_points(filled.mean(axis=0)[::-1])
    result, _, _ = _run(volume, VolumePrompts(positive=centre), 0.2)
    assert result.decisions.point["chosen"] is not None
    assert result.decisions.grown == []
    assert dice(result.mask, truth) > 0.9


@pytest.mark.parametrize("growth", [-0.1, float("nan"), float("inf"), "0.1", True])
def test_an_unusable_growth_is_refused_by_name(growth):
    volume, truth = organ()
    index = _centre(truth)
    roi = VolumePrompts(roi=slice_box_roi(volume, 0, index, truth_box(truth, index, -0.1)))
    with pytest.raises(InputError, match="seed_box_growth"):
        _run(volume, roi, growth)
