"""The interactive session: encode once per slice, clicks cost the decoder only."""

from __future__ import annotations

import numpy as np
import pytest
from doubles import ThresholdPredictor

from RobustMedSAMLib.datasets.phantoms import sphere
from RobustMedSAMLib.errors import CancelledError, InputError
from RobustMedSAMLib.formats.volume import Volume
from RobustMedSAMLib.inference.predictor import Predictor
from RobustMedSAMLib.inference.session import SegmentationSession
from RobustMedSAMLib.model.config import TINY
from RobustMedSAMLib.model.sam import SegmentAnythingModel


@pytest.fixture
def volume() -> Volume:
    phantom = sphere((24, 40, 48), radius=8.0)
    return Volume(phantom.image, phantom.ijk_to_ras, "sphere")


@pytest.fixture
def tiny_predictor(tiny_robust_state) -> Predictor:
    model = SegmentAnythingModel(TINY, robust=True)
    model.load_state_dict(tiny_robust_state)
    return Predictor(model, preprocessing="medsam")


def test_each_slice_is_encoded_once(volume, tiny_predictor):
    session = SegmentationSession(volume, tiny_predictor, "axial")
    first = session.click(12, (20, 24))
    second = session.click(12, (10, 5), positive=False)  # refines with fed-back logits
    session.segment_slice(13, session_prompt())
    assert session.stats.encoder_calls == 2 and session.stats.encoded == [12, 13]
    assert session.stats.decoder_calls == 3
    assert first.mask.shape == second.mask.shape == (40, 48)


def session_prompt():
    from RobustMedSAMLib.inference.types import SlicePrompt

    return SlicePrompt(box=[5, 5, 30, 30])


def test_memory_bound_evicts_oldest(volume, tiny_predictor):
    session = SegmentationSession(volume, tiny_predictor, cache_bytes=1)
    for index in (3, 4, 3):
        session.encoded(index)
    assert session.stats.encoder_calls == 3  # slice 3 was evicted, encoded again


def test_disk_cache_gives_identical_masks(tmp_path, volume, tiny_predictor):
    first = SegmentationSession(volume, tiny_predictor, disk_cache=tmp_path, model_id="m")
    want = first.segment_slice(10, session_prompt())
    second = SegmentationSession(volume, tiny_predictor, disk_cache=tmp_path, model_id="m")
    got = second.segment_slice(10, session_prompt())
    assert second.stats.encoder_calls == 0 and second.stats.disk_hits == 1
    np.testing.assert_array_equal(got.low_res_logits, want.low_res_logits)
    other = SegmentationSession(volume, tiny_predictor, disk_cache=tmp_path, model_id="other")
    other.segment_slice(10, session_prompt())
    assert other.stats.encoder_calls == 1  # another model never reads this cache


def test_axes_and_errors(volume):
    predictor = ThresholdPredictor(threshold=100)
    assert SegmentationSession(volume, predictor, "axial").n_slices == 24
    assert SegmentationSession(volume, predictor, "coronal").n_slices == 40
    assert SegmentationSession(volume, predictor, "sagittal").n_slices == 48
    session = SegmentationSession(volume, predictor)
    with pytest.raises(InputError, match="outside 0..23"):
        session.slice_image(24)
    with pytest.raises(CancelledError):
        session.encode_slices([1, 2], cancel=lambda: True)


def test_undo_click_restores_previous_points(volume):
    phantom_threshold = float(np.percentile(volume.array, 90))
    session = SegmentationSession(volume, ThresholdPredictor(phantom_threshold))
    include = session.click(12, (24, 20))
    session.click(12, (24, 20), positive=False)
    again = session.undo_click(12)
    np.testing.assert_array_equal(again.mask, include.mask)
    assert session.undo_click(12) is None
