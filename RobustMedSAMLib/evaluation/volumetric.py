"""3D evaluation: a point or box on the object's central slice, the model's mask there,
then propagation through the volume; Dice / IoU against the 3D truth and per slice.

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
from RobustMedSAMLib.inference.propagation import PropagationOptions, propagate
from RobustMedSAMLib.inference.session import SegmentationSession
from RobustMedSAMLib.inference.slicing import get_slice, set_slice


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
    propagate with ``options`` (its ``projection`` picks the mode), score in 3D.
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
    start = session.segment_slice(index, prompt)
    mask = np.zeros(truth.shape, bool)
    if start.mask.any():
        result = propagate(
            session, {index: start.mask}, options, seed_logits={index: start.low_res_logits}
        )
        for z in range(result.mask.shape[0]):
            set_slice(mask, axis, z, result.mask[z])
    slices = [(z - index, d) for z, d in per_slice_dice(mask, truth, axis)]
    calls = session.stats.decoder_calls - calls_before
    return VolumeResult(dice(mask, truth), iou(mask, truth), slices, index, calls, mask)
