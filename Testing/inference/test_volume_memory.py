"""Big volumes are not copied needlessly: the automatic window reads a sample, the
embedding cache's content key hashes the voxels in place; a ``segment`` run keeps only
the features of the slices it may ask again.

Before: ``auto_window`` converted the whole array to float64 and then copied its finite
voxels, about 8 + 8 bytes per voxel (1.3 GB for a 512 x 512 x 300 CT) before sampling
2 M of them: alone most of the 1.5 GB the issue allows the whole process.
"""

from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path

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


def test_session_cache_key_hashes_the_voxels_in_place():
    """The disk cache's content key: the same digest as of the bytes, without a copy of
    the volume (``tobytes`` copied it whole)."""
    import hashlib

    from RobustMedSAMLib.formats.volume import Volume
    from RobustMedSAMLib.inference.session import SegmentationSession

    array = np.random.default_rng(2).integers(-1000, 1000, (60, 256, 256), dtype=np.int16)
    session = SegmentationSession(Volume(array, np.eye(4)), _NoModel(), window=(-160.0, 240.0))
    tracemalloc.start()
    try:
        key = session.cache_key()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    digest = hashlib.sha256()
    digest.update(f"{array.shape}{array.dtype}{session.axis}{session.window}".encode())
    digest.update(f"{session.model_id}{session.style}".encode())
    digest.update(array.tobytes())
    assert key == digest.hexdigest()[:32]
    assert peak < array.nbytes / 10  # 7.9 MB of voxels; no copy of them


class _NoModel:
    """A predictor stand-in: the key needs no model work, only its preprocessing's name."""

    class preprocessor:  # noqa: N801
        style = "litemedsam"

    def encode(self, image, window=None):
        raise AssertionError("not called")


def test_cpu_encoder_calls_hand_freed_memory_back(tiny_sam_state, monkeypatch):
    """Each CPU encode ends with ``malloc_trim`` (glibc kept the activations' freed blocks
    in the encoding thread's arena: 1.9 GB peak for the benchmark CT, see
    docs/evidence.md); the features are the same with it as without it."""
    import torch

    import RobustMedSAMLib.device as device
    from RobustMedSAMLib.inference.predictor import Predictor
    from RobustMedSAMLib.model.config import TINY
    from RobustMedSAMLib.model.sam import SegmentAnythingModel

    model = SegmentAnythingModel(TINY, robust=False)
    model.load_state_dict(tiny_sam_state)
    predictor = Predictor(model, "medsam")
    image = np.random.default_rng(0).integers(0, 255, size=(90, 120)).astype(np.uint8)
    trims: list[int] = []
    monkeypatch.setattr(device, "_malloc_trim", lambda: trims.append)
    trimmed = predictor.encode(image, (0, 255)).features.embedding
    assert trims == [0]
    monkeypatch.setattr(device, "_malloc_trim", lambda: None)
    plain = predictor.encode(image, (0, 255)).features.embedding
    assert torch.equal(trimmed, plain)
    device.release_free_memory(torch.device("meta"))  # not the CPU: nothing is called
    assert trims == [0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_malloc_trim_is_found_on_linux():
    import RobustMedSAMLib.device as device

    device._malloc_trim.cache_clear()
    assert device._malloc_trim() is not None


def test_a_segment_run_keeps_few_slices_features_and_encodes_each_once():
    """``segment`` asks each slice once (then re-asks it at once): it holds at most
    ``ONE_PASS_CACHE_BYTES`` of features, not every slice it passed (19 MB a slice with
    robustmedsam-lite: 0.3 GB over a 16-slice organ, the process's 1.5 GB budget's margin).

    Before: the session kept up to 1 GiB of features (every slice of the run)."""
    from volumes import centre_ras

    from RobustMedSAMLib.datasets.phantoms import sphere
    from RobustMedSAMLib.formats.volume import Volume
    from RobustMedSAMLib.inference.batch import SegmentSettings, make_segmenter
    from RobustMedSAMLib.inference.segment_volume import VolumePrompts
    from RobustMedSAMLib.inference.session import ONE_PASS_CACHE_BYTES

    phantom = sphere((12, 40, 40), radius=5.5, texture="ct")
    volume = Volume(phantom.image, np.eye(4), "sphere", "CT")
    segmenter = make_segmenter(
        SegmentSettings(model="robustmedsam-lite", device="cpu", propagate=True), "cpu"
    )
    prompts = VolumePrompts(positive=centre_ras(volume, phantom.mask)[None])
    result, _, session = segmenter.segment(volume, prompts, Path("sphere.nrrd"))
    encoded = session.stats.encoded
    per_slice = session.encoded(encoded[-1]).features.nbytes
    assert len(encoded) * per_slice > ONE_PASS_CACHE_BYTES  # the budget binds here
    assert len(encoded) == len(set(encoded))  # no slice encoded twice
    cached = sum(e.features.nbytes for e in session._cache.values())
    assert cached <= ONE_PASS_CACHE_BYTES
    assert result.mask.any()
