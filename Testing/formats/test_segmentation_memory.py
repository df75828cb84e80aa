"""Writing a big mask copies it no more than the NRRD writer must: a bool mask is
written through a uint8 view of it, and its values are found slice by slice.

Before: the bool -> uint8 copy and ``np.unique``'s sorted copy of the whole mask were
alive together, a peak of 2.24 x the mask's bytes (traced); pynrrd's own ``tobytes`` and
the gzip stream are the rest, about 1.2 x.
"""

from __future__ import annotations

import tracemalloc

import numpy as np

from RobustMedSAMLib.formats.segmentation import read_segmentation, write_segmentation
from RobustMedSAMLib.formats.volume import Volume


def _traced_peak(function) -> int:
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_big_bool_mask_is_written_without_extra_copies(tmp_path):
    mask = np.zeros((40, 512, 512), bool)
    mask[10:30, 100:300, 150:350] = True
    volume = Volume(np.zeros(mask.shape, np.int16), np.diag([0.7, 0.7, 2.5, 1.0]))
    path = tmp_path / "big.seg.nrrd"
    peak = _traced_peak(lambda: write_segmentation(path, mask, volume))
    assert peak < 1.5 * mask.nbytes  # one copy (pynrrd's) + the gzip stream, not two
    labelmap = read_segmentation(path)[0]
    assert labelmap.dtype == np.uint8 and np.array_equal(labelmap, mask)


def test_label_values_are_found_in_every_slice(tmp_path):
    mask = np.zeros((6, 20, 30), np.uint16)
    mask[0, 1, 1], mask[5, 19, 29] = 3, 300  # first and last slice
    volume = Volume(np.zeros(mask.shape, np.int16), np.eye(4))
    segments = [(3, "a", (1.0, 0.0, 0.0)), (300, "b", (0.0, 1.0, 0.0))]
    path = write_segmentation(tmp_path / "two.seg.nrrd", mask, volume, segments)
    assert np.array_equal(read_segmentation(path)[0], mask)
