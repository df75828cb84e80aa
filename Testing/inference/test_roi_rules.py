"""How a box (ROI) drives propagation: a flat ROI is a 2D box on its slice, propagated
until the structure ends; a 3D ROI bounds the result (no voxel outside it) and cuts each
carried box to its footprint. The run record says what was decided."""

from __future__ import annotations

import json

import numpy as np
import pytest
from doubles import ThresholdPredictor
from volumes import oblique

from RobustMedSAMLib.cli import main
from RobustMedSAMLib.datasets.phantoms import sphere
from RobustMedSAMLib.formats.markups import write_roi
from RobustMedSAMLib.formats.volume import write_volume
from RobustMedSAMLib.inference.propagation import PropagationOptions, propagate
from RobustMedSAMLib.inference.segment_volume import SegmentOptions, VolumePrompts, segment_volume
from RobustMedSAMLib.inference.session import SegmentationSession
from RobustMedSAMLib.inference.slicing import ijk_box_roi, roi_voxels
from RobustMedSAMLib.inference.types import Prediction, SlicePrompt

THRESHOLD = 80.0  # HU halfway between the phantoms' background (40) and objects (120)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * (a & b).sum() / max(1, a.sum() + b.sum()))


def box_on_central_slice(volume, mask: np.ndarray, thickness: float):
    """An ROI around the mask's in-plane extent on its central slice, ``thickness`` slices."""
    k = int(round(np.argwhere(mask)[:, 0].mean()))
    _, j, i = np.nonzero(mask[k : k + 1])
    low = (i.min() - 1, j.min() - 1, k - thickness / 2)
    high = (i.max() + 1, j.max() + 1, k + thickness / 2)
    return ijk_box_roi(volume, low, high)


@pytest.mark.parametrize("thickness", [0.01, 1.0, 2.0])
def test_a_flat_roi_on_the_central_slice_covers_the_whole_sphere(thickness):
    # before: the ROI's 1..2 slices bounded propagation, so the mask stopped there
    phantom = sphere((40, 48, 56), spacing=(0.8, 0.8, 2.0), radius=14.0)
    volume = oblique(phantom)
    roi = box_on_central_slice(volume, phantom.mask, thickness)
    session = SegmentationSession(volume, ThresholdPredictor(THRESHOLD))
    result = segment_volume(session, VolumePrompts(roi=roi), SegmentOptions(propagate=True))
    truth_slices = np.flatnonzero(phantom.mask.any(axis=(1, 2)))
    assert result.decisions.roi == "2d"
    assert result.decisions.covered == (truth_slices[0], truth_slices[-1])
    assert dice(result.mask, phantom.mask) >= 0.9


def test_a_3d_roi_leaves_no_voxel_outside_it():
    # before: whole discs the box mostly held came back, 40 % of them outside the ROI
    phantom = sphere((40, 48, 56), spacing=(0.8, 0.8, 2.0), radius=14.0)
    volume = oblique(phantom)
    centre = np.argwhere(phantom.mask).mean(axis=0)[::-1]  # i, j, k
    roi = ijk_box_roi(volume, centre - (9, 17, 5), centre + (20, 17, 5))  # cuts one side
    session = SegmentationSession(volume, ThresholdPredictor(THRESHOLD))
    result = segment_volume(session, VolumePrompts(roi=roi), SegmentOptions(propagate=True))
    inside = roi_voxels(volume, roi)
    assert result.decisions.roi == "3d" and result.mask.any()
    assert not (result.mask & ~inside).any()
    # and it fills what the ROI holds of the sphere on every slice the ROI spans
    assert dice(result.mask, phantom.mask & inside) >= 0.95


class BoxRecorder:
    """Segments a fixed disc per slice and records the boxes it was given."""

    def __init__(self, masks: np.ndarray) -> None:
        self.masks, self.boxes = masks, {}

    @property
    def n_slices(self) -> int:
        return len(self.masks)

    def segment_slice(self, index: int, prompt: SlicePrompt) -> Prediction:
        self.boxes[index] = prompt.box
        logits = np.zeros((1, 256, 256), np.float32)
        return Prediction(self.masks[index].copy(), 0.9, logits)


def test_each_carried_box_is_cut_to_the_roi_footprint_on_its_slice():
    rows, cols = np.mgrid[:40, :40]
    disc = (rows - 20) ** 2 + (cols - 20) ** 2 <= 12**2
    masks = np.stack([disc] * 9)
    allowed = np.zeros_like(masks)
    for z in range(9):  # a footprint that shifts right slice by slice
        allowed[z, 10:30, 12 + z : 28 + z] = True
    segmenter = BoxRecorder(masks)
    result = propagate(segmenter, {4: disc & allowed[4]}, PropagationOptions(), allowed=allowed)
    assert sorted(segmenter.boxes) == [0, 1, 2, 3, 5, 6, 7, 8]
    for z, box in segmenter.boxes.items():
        x0, y0, x1, y1 = box
        assert (x0, y0, x1, y1) >= (12 + z, 10, 0, 0) and x1 <= 27 + z and y1 <= 29
    assert not (result.mask & ~allowed).any()


def test_cli_record_says_what_was_decided(tmp_path):
    phantom = sphere((12, 40, 48), spacing=(0.9, 0.9, 2.5), radius=9.0)
    volume = oblique(phantom)
    path = write_volume(volume, tmp_path / "ct.nrrd")
    box = write_roi(tmp_path / "box.mrk.json", box_on_central_slice(volume, phantom.mask, 1.0))
    out = tmp_path / "out.seg.nrrd"
    args = ["segment", str(path), "--box", str(box), "--out", str(out), "--propagate"]
    assert main([*args, "--device", "cpu"]) == 0
    decisions = json.loads((tmp_path / "out.seg.nrrd.json").read_text())["decisions"]
    assert decisions["roi"] == "2d" and decisions["roi_slices"] == pytest.approx(1.0)
    assert decisions["window_source"] == "percentile:0.5..99.5"
    assert decisions["zoom"] is False and decisions["zoom_reason"].startswith("auto")
    assert set(decisions["ends"]) == {"low", "high"}
    assert all(isinstance(v, str) for v in decisions["ends"].values())
