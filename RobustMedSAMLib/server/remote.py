"""``segment --server URL``: the CLI's and the batch's case segmenter with the model
work on an inference server; same files and run record as in-process."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from RobustMedSAMLib.server.client import ServerClient, read_token


@dataclass
class RemoteResult:
    """The parts of a SegmentationResult the writers and the CLI use."""

    mask: np.ndarray
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def slices(self) -> list[dict[str, Any]]:
        return self.record.get("slices", [])

    @property
    def seconds(self) -> float:
        return self.record.get("timings", {}).get("total_seconds", 0.0)


class RemoteCaseSegmenter:
    """``segment``/``write`` as ``CaseSegmenter``, against ``settings.server``."""

    def __init__(self, settings) -> None:
        self.settings, self.options = settings, settings.options()
        self.client = ServerClient(settings.server, read_token(settings.token,
                                                               settings.token_file))  # fmt: skip
        self.served = self.client.health()["model"]

    def segment(self, volume, prompts, volume_path: Path, progress=None):
        """Segment ``volume`` from RAS ``prompts`` on the server: ``(result, record, None)``."""
        s = self.settings
        propagation = self.options.propagation
        options = {"projection": propagation.projection,
                   "iou_threshold": propagation.iou_threshold,
                   "min_score": propagation.min_score,
                   "min_likeness": propagation.min_likeness,
                   "min_stability": propagation.min_stability,
                   "refine_steps": propagation.refine_steps,
                   "bounds": list(propagation.bounds) if propagation.bounds else None,
                   "slice_step": propagation.slice_step,
                   "zoom": self.options.zoom,
                   "seed_box_growth": self.options.seed_box_growth}  # fmt: skip
        opened = self.client.open_session(volume.array, volume.ijk_to_ras, s.axis, s.window,
                                          s.model, volume.name)  # fmt: skip
        with opened as session:
            record = session.segment(prompts.positive, prompts.negative, prompts.roi,
                                     s.propagate, options, progress=progress)  # fmt: skip
            mask = session.mask.copy()
        record["inputs"].update(volume=str(volume_path), axis=s.axis, server=self.client.url)
        return RemoteResult(mask, record), record, None

    def write(self, out: Path, result, volume, record: dict[str, Any]) -> None:
        from RobustMedSAMLib.formats.segmentation import write_case

        write_case(out, result.mask, volume, record, self.settings.segment_name)
