"""3D evaluation: a point or box on the object's central slice, segmented into 3D by the
product's own pipeline (``segment_volume`` with ``propagate``, as ``robustmedsam segment
--propagate`` does from that one prompt); Dice / IoU against the 3D truth and per slice.

The pipeline decides what a user's run decides: a box is a flat (one-slice) ROI, zoomed
on when small at the model's input; a point goes through the point search; the prompt
carried to the next slice suits the model (box alone for a box-only model); the stop
rules see the windowed slices (likeness). Only the encode-ahead worker is off (it
changes timings, never masks).

Frames: volumes and masks are KJI ``(K, J, I)``; ``axis`` is the numpy axis sliced
(0 = K); slice prompts are ``(x, y)`` slice pixels (see ``slicing.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.evaluation.interactive import SlicePredictor, first_prompt
from RobustMedSAMLib.evaluation.metrics import dice, iou, per_slice_dice
from RobustMedSAMLib.formats.volume import Volume
from RobustMedSAMLib.inference.propagation import PropagationOptions
from RobustMedSAMLib.inference.segment_volume import SegmentOptions, VolumePrompts, segment_volume
from RobustMedSAMLib.inference.session import SegmentationSession
from RobustMedSAMLib.inference.slicing import get_slice, slice_box_roi, slice_point_ras
from RobustMedSAMLib.inference.types import SlicePrompt


@dataclass
class VolumeResult:
    """dice, iou: of the whole 3D mask; per_slice: ``(offset from the prompted slice,
    Dice)`` for slices non-empty in the prediction or the truth; prompt_slice: the
    prompted index; model_calls: decoder calls (prompt + propagation)."""

    dice: float
    iou: float
    per_slice: list[tuple[int, float]]
    prompt_slice: int
    model_calls: int
    mask: np.ndarray = field(repr=False)


def central_slice(truth: np.ndarray, axis: int = 0) -> int:
    """The middle of the object's extent along ``axis`` (nearest non-empty slice)."""
    other = tuple(a for a in range(3) if a != axis)
    filled = np.flatnonzero(np.asarray(truth, bool).any(axis=other))
    if filled.size == 0:
        raise InputError("the truth mask is empty: nothing to evaluate")
    middle = (filled[0] + filled[-1]) / 2.0
    return int(filled[np.argmin(np.abs(filled - middle))])


def volume_prompts(volume: Volume, axis: int, index: int, prompt: SlicePrompt) -> VolumePrompts:
    """A slice prompt on slice ``index`` as the RAS prompts a user would save there: the
    box as a one-slice ROI, the points as positive / negative RAS points."""
    points = np.asarray(prompt.points, float).reshape(-1, 2)
    labels = np.asarray(prompt.labels, int).reshape(-1)
    ras = np.array([slice_point_ras(volume, axis, index, xy) for xy in points]).reshape(-1, 3)
    roi = None if prompt.box is None else slice_box_roi(volume, axis, index, prompt.box)
    return VolumePrompts(
        positive=ras[labels == 1] if (labels == 1).any() else None,
        negative=ras[labels == 0] if (labels == 0).any() else None,
        roi=roi,
    )


def evaluate_volume(
    predictor: SlicePredictor,
    volume: Volume,
    truth: np.ndarray,
    first: str = "point",
    options: PropagationOptions | None = None,
    axis: int = 0,
    window: tuple[float, float] | None = None,
    session: SegmentationSession | None = None,
    jitter: float = 0.0,
    seed: int = 0,
) -> VolumeResult:
    """Prompt the central slice of ``truth`` (``(K, J, I)`` bool on ``volume``'s grid),
    segment it into 3D with ``segment_volume`` (``options``: its propagation options;
    the pipeline may change the projection for a box-only model), score in 3D.
    ``session``: an existing session on ``volume`` whose cached embeddings to reuse;
    ``jitter``, ``seed``: the first prompt's (``interactive.first_prompt``)."""
    truth = np.asarray(truth, bool)
    if truth.shape != volume.shape:
        raise InputError(f"mask {truth.shape} and volume {volume.shape} differ in shape")
    index = central_slice(truth, axis)
    if session is None:
        session = SegmentationSession(volume, predictor, axis=axis, window=window)
    calls_before = session.stats.decoder_calls
    prompt = first_prompt(get_slice(truth, axis, index), first, jitter, seed)
    segment = SegmentOptions(
        propagate=True, propagation=options or PropagationOptions(), encode_ahead=0
    )
    mask = segment_volume(session, volume_prompts(volume, axis, index, prompt), segment).mask
    slices = [(z - index, d) for z, d in per_slice_dice(mask, truth, axis)]
    calls = session.stats.decoder_calls - calls_before
    return VolumeResult(dice(mask, truth), iou(mask, truth), slices, index, calls, mask)
