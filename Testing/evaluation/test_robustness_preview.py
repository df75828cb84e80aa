"""The corruption preview: the same prompts on a clean and a corrupted volume."""

from __future__ import annotations

import numpy as np
from doubles import ThresholdPredictor
from volumes import centre_ras

from RobustMedSAMLib.corruptions import corrupt
from RobustMedSAMLib.datasets.phantoms import sphere
from RobustMedSAMLib.evaluation.metrics import dice
from RobustMedSAMLib.evaluation.robustness_preview import compare, corrupted_array
from RobustMedSAMLib.formats.volume import Volume
from RobustMedSAMLib.inference.segment_volume import SegmentOptions, VolumePrompts
from RobustMedSAMLib.inference.session import SegmentationSession

THRESHOLD = 80.0  # HU between the phantom's background (40) and its ball (120)


def test_compare_segments_both_volumes_and_reports_their_dice():
    phantom = sphere((20, 40, 40), spacing=(0.9, 0.8, 2.0), radius=11.0)
    clean_volume = Volume(phantom.image, phantom.ijk_to_ras, "clean")
    noisy = corrupted_array(clean_volume, "gaussian_noise", 5, seed=1)
    corrupted_volume = Volume(noisy, phantom.ijk_to_ras, "corrupted")
    window = (0.0, 200.0)
    clean = SegmentationSession(clean_volume, ThresholdPredictor(THRESHOLD), 0, window=window)
    corrupted = SegmentationSession(
        corrupted_volume, ThresholdPredictor(THRESHOLD), 0, window=window
    )
    prompts = VolumePrompts(positive=centre_ras(clean_volume, phantom.mask))
    seen: list[int] = []

    result = compare(
        clean, corrupted, prompts, SegmentOptions(propagate=True), lambda d, t: seen.append(d)
    )
    assert seen == sorted(seen) and seen[-1] == 200  # two halves of 100
    assert result.dice == dice(result.clean_mask, result.corrupted_mask)
    assert dice(result.clean_mask, phantom.mask) >= 0.9
    assert 0.0 < result.dice < 1.0  # heavy noise changes the threshold double's mask

    same = compare(clean, clean, prompts, SegmentOptions(propagate=True))
    assert same.dice == 1.0


def test_corrupted_array_blurs_in_millimetres_along_each_axis():
    """One bright voxel on 0.5 mm columns and 2 mm rows: a blur of a few mm spreads over
    four times more columns than rows (spacing reaches ``corrupt`` in KJI order)."""
    array = np.zeros((3, 41, 41), np.float32)
    array[1, 20, 20] = 1000.0
    ijk_to_ras = np.diag([0.5, 2.0, 3.0, 1.0])  # I, J, K spacing
    blurred = corrupted_array(Volume(array, ijk_to_ras, "dot"), "gaussian_blur", 3)
    middle = blurred[1]
    spread_cols = (middle[20] > middle.max() / 2).sum()
    spread_rows = (middle[:, 20] > middle.max() / 2).sum()
    assert spread_cols > 2 * spread_rows
    reference = corrupt(array, "gaussian_blur", 3, spacing=(3.0, 2.0, 0.5))
    np.testing.assert_array_equal(blurred, reference)
