"""The corruption preview: how much a degradation changes the model's mask.

The same prompts segment a volume and a corrupted copy of it (two sessions on the same
grid, same model, axis and window); the Dice between the two masks says how robust the
model is to that corruption on this scan (1.0: the corruption changed nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from RobustMedSAMLib.corruptions import corrupt
from RobustMedSAMLib.evaluation.metrics import dice
from RobustMedSAMLib.formats.volume import Volume
from RobustMedSAMLib.progress import Cancel, Progress

if TYPE_CHECKING:
    from RobustMedSAMLib.inference.segment_volume import SegmentOptions, VolumePrompts
    from RobustMedSAMLib.inference.session import SegmentationSession


@dataclass
class PreviewComparison:
    """The masks on the clean and the corrupted volume (``(K, J, I)`` bool on the same
    grid) and the Dice between them."""

    clean_mask: np.ndarray
    corrupted_mask: np.ndarray
    dice: float


def corrupted_array(volume: Volume, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """``volume.array`` (KJI) degraded by corruption ``name`` at ``severity`` 1..5, with
    the volume's voxel spacing (mm, KJI order)."""
    spacing_kji = tuple(float(s) for s in volume.spacing[::-1])
    return corrupt(volume.array, name, int(severity), seed=int(seed), spacing=spacing_kji)


def compare(
    clean: SegmentationSession,
    corrupted: SegmentationSession,
    prompts: VolumePrompts,
    options: SegmentOptions | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> PreviewComparison:
    """Segment ``prompts`` (world RAS) on both sessions and compare the masks. Progress
    runs 0..200: the clean half, then the corrupted half."""
    from RobustMedSAMLib.inference.segment_volume import segment_volume

    steps = [0, 0]

    def half(part: int) -> Callable[[int, int], None] | None:
        if progress is None:
            return None

        def report(done: int, total: int) -> None:
            steps[part] = int(100 * done / max(1, total))
            progress(sum(steps), 200)

        return report

    clean_mask = segment_volume(clean, prompts, options, half(0), cancel).mask
    corrupted_mask = segment_volume(corrupted, prompts, options, half(1), cancel).mask
    return PreviewComparison(clean_mask, corrupted_mask, dice(clean_mask, corrupted_mask))
