"""The automatic window reads a sample of a big volume without copying it whole.

Before: ``auto_window`` converted the whole array to float64 and then copied its finite
voxels, about 8 + 8 bytes per voxel (1.3 GB for a 512 x 512 x 300 CT) before sampling
2 M of them: alone most of the 1.5 GB the issue allows the whole process.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.inference.preprocessing import WINDOW_SAMPLE, auto_window


def _reference(array: np.ndarray, percentiles=(0.5, 99.5)) -> tuple[float, float]:
    """The former rule on a volume without NaN: every ``size // WINDOW_SAMPLE``-th voxel."""
    finite = array.astype(np.float64).ravel()
    sample = finite if finite.size <= WINDOW_SAMPLE else finite[:: finite.size // WINDOW_SAMPLE]
    low, high = np.percentile(sample, percentiles)
    return float(low), float(high)


def test_big_volume_window_allocates_only_the_sample():
    rng = np.random.default_rng(0)
    volume = rng.integers(-1024, 3000, size=(100, 512, 512), dtype=np.int16)  # 26 M voxels
    tracemalloc.start()
    try:
        window = auto_window(volume)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert window == _reference(volume)
    # The float64 sample (16 MB), its finite copy and percentile's partitioned copy:
    # at most 3 x 8 bytes per sampled voxel (+ its 1-byte finite mask), whatever the
    # volume's size. The whole volume in float64 would be 210 MB.
    assert peak <= 3.2 * 8 * WINDOW_SAMPLE < volume.size * 8


def test_small_and_non_contiguous_arrays_use_every_voxel():
    rng = np.random.default_rng(1)
    volume = rng.normal(100, 30, (40, 60, 70)).astype(np.float32)
    assert auto_window(volume) == _reference(volume)
    view = volume.transpose(2, 0, 1)[::2]
    assert auto_window(view) == _reference(np.ascontiguousarray(view))


def test_nan_voxels_are_skipped_even_when_the_sample_misses_the_finite_ones():
    volume = np.full((30, 512, 512), np.nan, np.float32)  # sampled every 3rd voxel
    volume.reshape(-1)[[1000, 5_000_002]] = 0.0, 8.0  # 2 finite voxels, off that grid
    low, high = auto_window(volume, (0.0, 100.0))
    assert (low, high) == (0.0, 8.0)
    with pytest.raises(InputError, match="no finite"):
        auto_window(np.full((4, 4), np.nan))
