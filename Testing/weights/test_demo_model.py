"""The bundled demo model segments for real: Dice on held-out phantoms and the sample.

Thresholds sit a margin below what the demo model measured (README, "The demo model").
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from RobustMedSAMLib.corruptions import corrupt
from RobustMedSAMLib.datasets.phantoms import ellipsoid, sphere, tube
from RobustMedSAMLib.errors import CheckpointError
from RobustMedSAMLib.formats.segmentation import read_segmentation
from RobustMedSAMLib.formats.volume import Volume, read_volume
from RobustMedSAMLib.inference.loader import load_named_model, verify_bundled
from RobustMedSAMLib.inference.segment_volume import SegmentOptions, VolumePrompts, segment_volume
from RobustMedSAMLib.inference.session import SegmentationSession
from RobustMedSAMLib.inference.types import SlicePrompt
from RobustMedSAMLib.weights.registry import get_source, resolve_checkpoint

SAMPLES = __import__("pathlib").Path(__file__).resolve().parents[2] / "Resources" / "samples"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


@pytest.fixture(scope="module")
def demo():
    return load_named_model("demo", device="cpu")


def held_out():
    """Shapes and seeds the demo never saw in training (it saw organ and random scenes)."""
    return [
        sphere((40, 96, 96), (1.0, 1.0, 2.0), radius=22.0, seed=101),
        ellipsoid((40, 96, 96), (1.0, 1.0, 2.0), (30.0, 18.0, 26.0), (0.0, 0.0, 25.0), seed=102),
        tube((40, 96, 96), (1.0, 1.0, 2.0), radius=9.0, seed=103),
        sphere((40, 96, 96), (1.0, 1.0, 2.0), radius=20.0, texture="mr", seed=104),
    ]


def central_box_and_point(mask2d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy import ndimage

    rows, cols = np.nonzero(mask2d)
    depth = ndimage.distance_transform_edt(mask2d)
    r, c = np.unravel_index(np.argmax(depth), depth.shape)
    return np.array([cols.min(), rows.min(), cols.max(), rows.max()], float), np.array(
        [[c, r]], float
    )


def test_bundled_file_is_verified():
    path = resolve_checkpoint("demo")
    verify_bundled(path, get_source("demo").sha256)
    assert path.stat().st_size < 25 * 1024**2


def test_a_damaged_demo_file_is_refused(tmp_path):
    copy = tmp_path / "robustmedsam_demo.pth"
    shutil.copy(resolve_checkpoint("demo"), copy)
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged or was replaced"):
        verify_bundled(copy, get_source("demo").sha256)


@pytest.mark.parametrize("prompt", ["box", "point"])
def test_2d_dice_on_held_out_phantoms(demo, prompt):
    predictor = demo.predictor()
    scores = []
    for phantom in held_out():
        k = int(np.argmax(phantom.mask.sum(axis=(1, 2))))
        box, point = central_box_and_point(phantom.mask[k])
        predictor.set_image(phantom.image[k])
        given = SlicePrompt(box=box) if prompt == "box" else SlicePrompt(points=point, labels=[1])
        scores.append(dice(predictor.predict(given).mask, phantom.mask[k]))
    assert np.mean(scores) >= (0.88 if prompt == "box" else 0.85), scores


def test_3d_from_a_central_point_on_held_out_phantoms(demo):
    scores = []
    for phantom in held_out()[:2]:
        volume = Volume(phantom.image, phantom.ijk_to_ras, "phantom")
        session = SegmentationSession(volume, demo.predictor(), "axial")
        k = int(np.argmax(phantom.mask.sum(axis=(1, 2))))
        _, point = central_box_and_point(phantom.mask[k])
        ras = volume.ijk_to_ras_points([[point[0, 0], point[0, 1], k]])
        result = segment_volume(
            session, VolumePrompts(positive=ras), SegmentOptions(propagate=True)
        )
        scores.append(dice(result.mask, phantom.mask))
    assert np.mean(scores) >= 0.80, scores


def test_degraded_images_stay_close_to_clean(demo):
    predictor = demo.predictor()
    phantom = held_out()[1]
    k = int(np.argmax(phantom.mask.sum(axis=(1, 2))))
    box, _ = central_box_and_point(phantom.mask[k])
    predictor.set_image(phantom.image[k])
    clean = dice(predictor.predict(SlicePrompt(box=box)).mask, phantom.mask[k])
    degraded = []
    for name in (
        "gaussian_noise",
        "gaussian_blur",
        "motion_ghosting",
        "bias_field",
        "jpeg_compression",
    ):
        predictor.set_image(corrupt(phantom.image[k], name, 3, seed=0))
        degraded.append(dice(predictor.predict(SlicePrompt(box=box)).mask, phantom.mask[k]))
    assert np.mean(degraded) >= clean - 0.08, (clean, degraded)


def test_sample_case_end_to_end(demo):
    """The README's first command: the bundled liver box, propagated, against the truth
    (measured 0.839)."""
    volume = read_volume(SAMPLES / "abdomen_phantom.nrrd")
    from RobustMedSAMLib.formats.markups import read_roi

    session = SegmentationSession(volume, demo.predictor(), "axial")
    prompts = VolumePrompts(roi=read_roi(SAMPLES / "liver_box.mrk.json"))
    result = segment_volume(session, prompts, SegmentOptions(propagate=True))
    truth = read_segmentation(SAMPLES / "liver_truth.seg.nrrd")[0] > 0
    assert dice(result.mask, truth) >= 0.78
