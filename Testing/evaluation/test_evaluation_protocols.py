"""The 2D click protocol and the 3D propagation protocol, through the library API.

``PaintPredictor`` (below) paints discs at clicks so that corrections visibly help;
``ThresholdPredictor`` (doubles.py) gives a meaningful Dice on phantoms.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from doubles import BoxBlobPredictor, ThresholdPredictor

from RobustMedSAMLib.datasets import phantoms
from RobustMedSAMLib.errors import CancelledError, InputError
from RobustMedSAMLib.evaluation.datasets import load_cases
from RobustMedSAMLib.evaluation.interactive import evaluate_interactive, first_prompt
from RobustMedSAMLib.evaluation.matrix import MatrixOptions, run_matrix
from RobustMedSAMLib.evaluation.metrics import dice
from RobustMedSAMLib.evaluation.models import ModelEntry
from RobustMedSAMLib.evaluation.report import degraded_summary, headline_scores, read_rows
from RobustMedSAMLib.evaluation.volumetric import central_slice, evaluate_volume, volume_prompts
from RobustMedSAMLib.formats.volume import Volume
from RobustMedSAMLib.inference.propagation import PROJECTIONS, PropagationOptions
from RobustMedSAMLib.inference.segment_volume import SegmentOptions, segment_volume
from RobustMedSAMLib.inference.session import SegmentationSession
from RobustMedSAMLib.inference.slicing import prompts_for_slice
from RobustMedSAMLib.inference.types import Prediction, SlicePrompt

THRESHOLD = 80.0  # HU between the phantoms' background (40) and objects (120)


class PaintPredictor:
    """Paints a disc of ``radius`` px at each positive point and erases one at each
    negative point, over the box and the fed-back mask; records every prompt (``asked``)."""

    def __init__(self, radius: int = 4) -> None:
        self.radius, self.shape, self.asked = radius, None, []

    def encode(self, image, window=None):
        return np.shape(image)

    def set_encoded(self, encoded) -> None:
        self.shape = encoded

    def predict(self, prompt: SlicePrompt) -> Prediction:
        self.asked.append(prompt)
        rows, cols = np.indices(self.shape)
        mask = np.zeros(self.shape, bool)
        if prompt.mask_input is not None:
            mask |= prompt.mask_input[0] > 0
        if prompt.box is not None:
            x0, y0, x1, y1 = prompt.box.astype(int)
            mask[y0 : y1 + 1, x0 : x1 + 1] = True
        for (x, y), label in zip(prompt.points, prompt.labels, strict=True):
            disc = (cols - x) ** 2 + (rows - y) ** 2 <= self.radius**2
            mask = mask | disc if label else mask & ~disc
        return Prediction(mask, 0.9, np.where(mask, 5.0, -5.0)[None].astype(np.float32))


def two_blobs() -> np.ndarray:
    truth = np.zeros((48, 48), bool)
    truth[6:22, 6:22] = True
    truth[28:42, 26:44] = True
    return truth


def test_corrections_improve_dice_and_feed_back_the_mask():
    truth = two_blobs()
    predictor = PaintPredictor()
    result = evaluate_interactive(predictor, truth * 100.0, truth, "point", n_corrections=7)
    assert len(result.dice) == len(result.iou) == 8
    assert np.all(np.diff(result.dice) > 0)  # every click lands in a miss and helps
    assert result.dice[0] < 0.25 and result.dice[-1] > 0.75
    assert result.clicks[0][:2] == (32.0, 34.0)  # second blob: the largest miss
    first, *corrections = predictor.asked
    assert first.mask_input is None and len(first.points) == 1
    for step, prompt in enumerate(corrections, start=2):
        assert prompt.mask_input is not None and len(prompt.points) == step


def test_box_first_prompt_and_perfect_mask_carries_on():
    truth = np.zeros((32, 32), bool)
    truth[8:20, 10:25] = True
    predictor = PaintPredictor()
    result = evaluate_interactive(predictor, truth * 1.0, truth, "box", n_corrections=3)
    assert result.dice == [1.0] * 4 and result.clicks == []
    assert predictor.asked[0].box.tolist() == [10, 8, 24, 19]
    with pytest.raises(InputError, match="differ in shape"):
        evaluate_interactive(predictor, np.zeros((4, 4)), truth)


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_volumetric_dice_on_phantoms_with_threshold_double(projection):
    for case in load_cases("phantom:all,size=40"):
        volume = Volume(case.image, case.ijk_to_ras)
        options = PropagationOptions(projection=projection)
        result = evaluate_volume(ThresholdPredictor(THRESHOLD), volume, case.mask, "box", options)
        # the organ scene's liver touches a lesion and neighbours: harder for a threshold
        assert result.dice > (0.8 if case.case.startswith("organ") else 0.95), case.case
        offsets = [offset for offset, _ in result.per_slice]
        assert 0 in offsets and min(offsets) < -5 and max(offsets) > 5
        assert result.model_calls >= len(offsets) - 2


def test_matrix_with_threshold_double_degrades_with_severity(tmp_path):
    cases = load_cases("phantom:sphere,size=32,count=2") + load_cases("phantom:tube,size=32")
    options = MatrixOptions(
        projections=("mask",),
        corruptions=("clean", "gaussian_noise", "gaussian_blur"),
        severities=(1, 5),
        seeds=(0, 1, 2),
        n_corrections=2,
    )
    entry = ModelEntry("threshold", lambda: ThresholdPredictor(THRESHOLD))
    result = run_matrix([entry], cases, tmp_path, options)
    # per case: clean + noise 2 severities x 3 seeds + blur 2 severities x 1 seed = 9 conditions,
    # each with 2 interactive and 2 volumetric variants
    assert (result.computed, result.skipped, result.failed) == (3 * 9 * 4, 0, 0)
    scores = headline_scores(read_rows(tmp_path / "results.csv"))
    volumetric = [s for s in scores if s.setting == "3D box/mask"]
    clean = np.mean([s.value for s in volumetric if s.corruption == "clean"])
    heavy = np.mean([s.value for s in volumetric if s.severity == 5])
    assert clean > 0.9 and heavy < clean
    degraded = degraded_summary(volumetric)
    assert degraded.seeds == 3 and degraded.std > 0 and degraded.mean < clean


def test_cancel_keeps_finished_cells(tmp_path):
    cases = load_cases("phantom:sphere,size=24")
    options = MatrixOptions(protocols=("interactive",), corruptions=("clean",), n_corrections=1)
    stop = threading.Event()
    entry = ModelEntry("threshold", lambda: ThresholdPredictor(THRESHOLD))

    def progress(done: int, total: int) -> None:
        if done == 1:
            stop.set()

    with pytest.raises(CancelledError):
        run_matrix([entry], cases, tmp_path, options, progress=progress, cancel=stop)
    rows = read_rows(tmp_path / "results.csv")
    assert {r["prompt"] for r in rows} == {"point"} and len(rows) == 4  # 2 steps x dice, iou
    stop.clear()
    assert run_matrix([entry], cases, tmp_path, options).computed == 1


@pytest.mark.parametrize(
    ("first", "model"), [("box", BoxBlobPredictor), ("point", ThresholdPredictor)]
)
def test_volumetric_protocol_is_the_segment_pipeline(first, model):
    """The 3D cell is what ``segment --propagate`` gives from the same prompt: for a
    box-only model that draws a blob past a structure's end, the likeness rule (which
    needs the pipeline's windowed slices) stops it where the sphere ends; a point goes
    through the point search."""
    case = load_cases("phantom:sphere,size=40")[0]
    volume = Volume(case.image, case.ijk_to_ras)
    result = evaluate_volume(model(THRESHOLD), volume, case.mask, first)
    session = SegmentationSession(volume, model(THRESHOLD), axis=0)
    index = central_slice(case.mask, 0)
    prompt = first_prompt(case.mask[index], first)
    prompts = volume_prompts(volume, 0, index, prompt)
    if first == "box":
        assert prompts.roi is not None and prompts.positive is None
    else:
        assert prompts.roi is None and len(prompts.positive) == 1
    expected = segment_volume(session, prompts, SegmentOptions(propagate=True)).mask
    assert np.array_equal(result.mask, expected)
    covered = np.flatnonzero(result.mask.any(axis=(1, 2)))
    truth_slices = np.flatnonzero(case.mask.any(axis=(1, 2)))
    assert set(covered) <= set(truth_slices)  # no blobs past the ends
    assert result.dice > 0.9


def test_volume_prompts_land_on_the_prompted_pixels():
    case = load_cases("phantom:sphere,size=40")[0]
    volume = Volume(case.image, case.ijk_to_ras)
    prompt = SlicePrompt(points=[(12.0, 20.0), (30.0, 5.0)], labels=[1, 0], box=(10, 8, 24, 19))
    prompts = volume_prompts(volume, 0, 7, prompt)
    per_slice = prompts_for_slice(volume, 0, prompts.positive, prompts.negative, prompts.roi)
    assert list(per_slice) == [7]
    got = per_slice[7]
    assert np.allclose(got.points, [(12, 20), (30, 5)]) and list(got.labels) == [1, 0]
    assert np.allclose(got.box, (10, 8, 24, 19), atol=0.5 + 1e-6)


def test_2d_point_on_a_box_only_model_is_what_a_click_gives():
    """The 2D protocol answers a point as the product does: a model trained with boxes
    only gets it through the point search, like ``SegmentationSession.click``. Before,
    the point went to the model alone (LiteMedSAM's 2D point Dice: about 0.06)."""
    phantom = phantoms.sphere((20, 64, 64), (1.0, 1.0, 2.0), 9.0, contrast=150.0, noise=10.0)
    volume = Volume(phantom.image.astype(np.float32), phantom.ijk_to_ras)
    window = (-160.0, 240.0)
    session = SegmentationSession(volume, BoxBlobPredictor(115.0), axis=0, window=window)
    index = central_slice(phantom.mask, 0)
    image, truth = session.slice_image(index), phantom.mask[index]
    result = evaluate_interactive(BoxBlobPredictor(115.0), image, truth, "point", 1, window)
    x, y = first_prompt(truth, "point").points[0]
    clicked = session.click(index, (x, y)).mask
    assert result.dice[0] == pytest.approx(dice(clicked, truth))
    assert result.dice[0] > 0.9  # the point alone: an empty mask, Dice 0
