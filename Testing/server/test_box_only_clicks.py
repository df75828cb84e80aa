"""A click with a box-only model (LiteMedSAM) goes through the point search, as
``segment`` does, on every click path: the in-process session's ``click``, the server's
``/click`` and, from a click's slice, the server's ``/propagate`` (which carries the box
alone to a model trained without mask prompts, as ``segment --propagate`` does).

``BoxBlobPredictor`` answers a point alone with nothing (LiteMedSAM's answer to a point
scored Dice about 0.03) and overflows when fed its own logits back.
"""

from __future__ import annotations

import numpy as np
import pytest
from doubles import BoxBlobPredictor
from server_harness import TOKEN, LiveServer, served

from RobustMedSAMLib.datasets import phantoms
from RobustMedSAMLib.formats.volume import Volume
from RobustMedSAMLib.inference.segment_volume import SegmentOptions, VolumePrompts, segment_volume
from RobustMedSAMLib.inference.session import SegmentationSession
from RobustMedSAMLib.inference.types import SlicePrompt
from RobustMedSAMLib.server.client import ServerClient

WINDOW = (-160.0, 240.0)


class Recording(BoxBlobPredictor):
    """Counts the prompts that carried a mask input."""

    fed_back = 0

    def predict(self, prompt):
        Recording.fed_back += prompt.mask_input is not None
        return super().predict(prompt)


@pytest.fixture(scope="module")
def scene():
    phantom = phantoms.sphere((20, 64, 64), (1.0, 1.0, 2.0), 9.0, contrast=150.0, noise=10.0)
    volume = Volume(phantom.image.astype(np.float32), phantom.ijk_to_ras, "sphere")
    k = int(np.round(np.argwhere(phantom.mask).mean(axis=0))[0])
    rows, cols = np.nonzero(phantom.mask[k])
    point = (float(cols.mean()), float(rows.mean()) + 3.0)  # (x, y), off the centre
    return volume, phantom.mask, k, point


@pytest.fixture(scope="module")
def server():
    with LiveServer(served(lambda: Recording(115.0))) as live:
        yield live


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def test_an_in_process_click_finds_the_structure_as_segment_does(scene):
    volume, truth, k, point = scene
    session = SegmentationSession(volume, BoxBlobPredictor(115.0), window=WINDOW)
    clicked = session.click(k, point).mask
    assert dice(clicked, truth[k]) > 0.9  # before: 0.00 (the point alone: nothing)
    ras = volume.ijk_to_ras_points(np.array([[point[0], point[1], k]]))
    other = SegmentationSession(volume, BoxBlobPredictor(115.0), window=WINDOW)
    segmented = segment_volume(other, VolumePrompts(positive=ras), SegmentOptions(zoom=False))
    np.testing.assert_array_equal(clicked, segmented.mask[k])
    # a second click goes with the box the search found and the first mask, not a new
    # search (a search per click made corrections lose: bench_corrections.py)
    points, labels = [point, (point[0], point[1] - 3.0)], [1, 0]
    box = session.kept_box(k, SlicePrompt(points, labels))
    logits = session.click_logits(k)
    second = session.click(k, points[1], positive=False).mask
    asked = SlicePrompt(points, labels, box, logits)
    np.testing.assert_array_equal(second, session.predictor.predict(asked).mask)


def test_the_servers_click_and_propagate_follow_the_structure(server, scene):
    volume, truth, k, point = scene
    client = ServerClient(server.url, TOKEN)
    with client.open_session(volume.array, volume.ijk_to_ras, "axial", WINDOW) as session:
        answer = session.click([point[0], point[1], k], frame="ijk")
        assert answer.slice == k
        assert dice(session.mask[k], truth[k]) > 0.9  # before: 0.00
        Recording.fed_back = 0
        stops = session.propagate([k])
        assert Recording.fed_back == 0  # the box alone, as segment carries it
        assert {s["reason"] for s in stops} == {"likeness"}
        covered = np.flatnonzero(session.mask.any(axis=(1, 2)))
        assert covered.tolist() == np.flatnonzero(truth.any(axis=(1, 2))).tolist()
        assert dice(session.mask, truth) > 0.9
