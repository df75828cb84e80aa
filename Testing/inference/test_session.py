"""The interactive session: encode once per slice, clicks cost the decoder only."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from doubles import ThresholdPredictor

from RobustMedSAMLib.datasets.phantoms import sphere
from RobustMedSAMLib.errors import CancelledError, InputError
from RobustMedSAMLib.formats.volume import Volume
from RobustMedSAMLib.inference.predictor import Predictor
from RobustMedSAMLib.inference.propagation import plan_order
from RobustMedSAMLib.inference.segment_volume import SegmentOptions, VolumePrompts, segment_volume
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


def test_an_encode_pass_over_a_full_cache_encodes_only_what_is_missing(volume, tiny_predictor):
    """The panel's encode-ahead after a click on a slice not held: the cache holds four
    slices (5-8; 4 was pushed out by 8), the pass asks for 4-7. Only 4 is encoded; in
    plain LRU order 4 pushed out 5, 5 pushed out 6, ...: four encodes."""
    session = SegmentationSession(volume, tiny_predictor)
    session.encoded(0)
    session.cache_bytes = 4 * session.cached_bytes()
    for index in range(4, 9):
        session.encoded(index)
    session.stats.encoded.clear()
    session.encode_slices([4, 5, 6, 7])
    assert session.stats.encoded == [4]


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


@pytest.mark.parametrize("xy", [(120.0, 20.0), (24.0, -3.0), (float("nan"), 20.0)])
def test_a_click_off_the_slice_is_refused_and_forgotten(volume, xy):
    # docs/python-api.md's click at (120, 88) on a smaller slice once raised an error
    # about an internal box, and the stored point spoiled every later click there
    session = SegmentationSession(volume, ThresholdPredictor(np.percentile(volume.array, 90)))
    with pytest.raises(InputError, match=r"click .* is outside slice 12, which is 48 x 40"):
        session.click(12, xy)
    first = session.click(12, (24, 20))
    again = SegmentationSession(volume, session.predictor).click(12, (24, 20))
    np.testing.assert_array_equal(first.mask, again.mask)
    assert session.click(12, (47.5, -0.5)).mask.shape == (40, 48)  # edge: half a pixel out


class RecordingPredictor(ThresholdPredictor):
    """Records, per encode, the slice (from a marker voxel: 1000 + index) and the thread;
    and the order of encodes and predictions."""

    def __init__(self, threshold: float) -> None:
        super().__init__(threshold)
        self.calls: list[tuple[int, str]] = []
        self.events: list[str] = []

    def encode(self, image, window=None):
        self.calls.append((int(image[0, 0]) - 1000, threading.current_thread().name))
        self.events.append("encode")
        return super().encode(image, window)

    def predict(self, prompt):
        self.events.append("predict")
        return super().predict(prompt)


def marked_sphere() -> Volume:
    """A 30-slice sphere whose corner voxel names its slice (1000 + index)."""
    phantom = sphere((30, 40, 48), radius=9.0)
    image = phantom.image.astype(np.float32)
    image[:, 0, 0] = 1000 + np.arange(30)
    return Volume(image, phantom.ijk_to_ras, "sphere")


def test_encoding_ahead_gives_the_same_masks_from_a_worker_thread():
    volume = marked_sphere()
    threshold = float(np.percentile(volume.array, 90))
    centre = volume.ijk_to_ras @ np.array([24.0, 20.0, 15.0, 1.0])
    prompts = VolumePrompts(positive=centre[None, :3])
    runs = {}
    for depth in (0, 2):
        predictor = RecordingPredictor(threshold)
        session = SegmentationSession(volume, predictor)
        options = SegmentOptions(propagate=True, encode_ahead=depth)
        runs[depth] = segment_volume(session, prompts, options), predictor.calls, session
    (plain, plain_calls, _), (ahead, ahead_calls, session) = runs[0], runs[2]
    assert session.predictor.events[:2] == ["encode", "predict"]  # the first mask comes first
    np.testing.assert_array_equal(ahead.mask, plain.mask)
    assert plain.mask[8:23].any(axis=(1, 2)).all()  # a real 3D result (the sphere's slices)
    assert {t for _, t in plain_calls} == {threading.current_thread().name}
    # one point: the point search encodes the prompted slice (15) before propagation starts
    assert all(t.startswith("encode-ahead") for z, t in ahead_calls if z != 15)
    assert sum(z != 15 for z, _ in ahead_calls) >= 8
    used = [i for i, _ in plain_calls]
    encoded = [i for i, _ in ahead_calls]
    assert len(encoded) == len(set(encoded)) and set(used) <= set(encoded)
    wasted = set(encoded) - set(used)
    assert len(wasted) <= 2 * 2  # at most `depth` past each end of the sphere
    assert session.stats.encoded == used and session.stats.encoder_calls == len(used)


def test_encoding_ahead_skips_the_slices_of_a_stopped_direction():
    volume = marked_sphere()
    predictor = RecordingPredictor(100.0)
    session = SegmentationSession(volume, predictor)
    order = plan_order([15], session.n_slices)  # 16, 14, 17, 13, 18, 12, ...
    asked = [16, 14, 17, 18, 19, 20, 21]  # the lower direction stops after slice 14
    with session.encoding_ahead(order, depth=2):
        for index in asked:
            session.segment_slice(index, session_prompt())
            time.sleep(0.01)  # the worker runs ahead while this slice decodes
    encoded = [i for i, _ in predictor.calls]
    assert len(encoded) == len(set(encoded))  # none twice
    assert set(asked) <= set(encoded)
    assert set(encoded) - set(asked) <= {13, 22, 23}  # one of the stopped side, 2 ahead
    assert session.stats.encoded == asked  # counted as they are used


def test_a_slice_asked_out_of_order_is_encoded_once():
    volume = marked_sphere()
    predictor = RecordingPredictor(100.0)
    session = SegmentationSession(volume, predictor)
    with session.encoding_ahead([5, 6, 7, 8, 9], depth=1):
        session.encoded(8)  # before its turn
        session.encoded(3)  # not planned: encoded here, as without encode-ahead
        session.encoded(9)
    encoded = [i for i, _ in predictor.calls]
    assert len(encoded) == len(set(encoded)) and {3, 8, 9} <= set(encoded)
    assert session.stats.encoded == [8, 3, 9]


def test_encoding_ahead_is_cancelled_by_an_event_too(volume):
    """``progress.Cancel`` is a callable or a ``threading.Event``, as propagation takes it
    (before: ``TypeError: 'Event' object is not callable`` from ``encode_slices``)."""
    session = SegmentationSession(volume, ThresholdPredictor(threshold=100))
    stop = threading.Event()
    session.encode_slices([1, 2], cancel=stop)
    stop.set()
    with pytest.raises(CancelledError, match="encoding cancelled"):
        session.encode_slices([3, 4], cancel=stop)
    assert session.stats.encoded == [1, 2]
