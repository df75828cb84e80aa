"""Simulated prompts for training, as MedicoSAM trains: a jittered box or positive points
sampled in the mask, then correction points from the error region, with the previous
mask logits fed back.

Frame: masks are ``B x L x L`` bool tensors on the decoder's low-res grid; points and
boxes come out in model-input pixels (x, y) = (low-res pixel centre) * ``scale``,
where ``scale = S / L`` (4 for SAM).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from RobustMedSAMLib.inference.mask_prompts import mask_box
from RobustMedSAMLib.training.config import PromptSection


@dataclass
class Prompts:
    """points ``B x N x 2`` (x, y) model-input pixels, labels ``B x N`` (1 include,
    0 exclude, -1 padding) or None; boxes ``B x 4`` (x0, y0, x1, y1) or None."""

    points: torch.Tensor | None
    labels: torch.Tensor | None
    boxes: torch.Tensor | None

    def add_points(self, points: torch.Tensor, labels: torch.Tensor) -> Prompts:
        if self.points is None:
            return Prompts(points, labels, self.boxes)
        return Prompts(
            torch.cat([self.points, points], 1), torch.cat([self.labels, labels], 1), self.boxes
        )

    def to(self, device: torch.device | str) -> Prompts:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device)

        return Prompts(move(self.points), move(self.labels), move(self.boxes))

    @property
    def is_lone_point(self) -> bool:
        """One point per sample and no box: SAM's ambiguous prompt (multimask output)."""
        return self.boxes is None and self.points is not None and self.points.shape[1] == 1

    @property
    def point_pair(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.points is None else (self.points, self.labels)


def initial_prompts(
    masks: torch.Tensor, rng: np.random.Generator, section: PromptSection, scale: float
) -> Prompts:
    """The first prompt of every sample: all boxes or all points (one draw per batch)."""
    use_box = rng.random() < section.box_probability
    if use_box:
        return Prompts(None, None, boxes_from_masks(masks, rng, section.box_jitter, scale))
    return Prompts(*points_in_masks(masks, rng, section.points, scale), None)


def boxes_from_masks(
    masks: torch.Tensor, rng: np.random.Generator, jitter: float, scale: float
) -> torch.Tensor:
    """``B x 4`` boxes: each side moved by up to ``jitter`` x the box size (uniform)."""
    size = masks.shape[-1]
    boxes = []
    for mask in masks.cpu().numpy():
        box = mask_box(mask, corners="edges").astype(np.float64)
        extent = np.repeat(box[2:] - box[:2], 2)[[0, 2, 1, 3]]
        box = box + rng.uniform(-jitter, jitter, 4) * extent
        box = np.clip(box, 0, size)
        box[2:] = np.maximum(box[2:], box[:2] + 1)
        boxes.append(box * scale)
    return torch.tensor(np.array(boxes), dtype=torch.float32)


def points_in_masks(
    masks: torch.Tensor, rng: np.random.Generator, count: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` positive points drawn uniformly inside each mask."""
    points = []
    for mask in masks.cpu().numpy():
        rows, cols = np.nonzero(mask)
        pick = rng.integers(len(rows), size=count)
        points.append(np.stack([cols[pick], rows[pick]], 1) + 0.5)
    xy = torch.tensor(np.array(points) * scale, dtype=torch.float32)
    return xy, torch.ones(xy.shape[:2], dtype=torch.int64)


def correction_points(
    predicted: torch.Tensor, masks: torch.Tensor, rng: np.random.Generator, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One point per sample from its error region: positive in a missed part, negative
    in a false detection; label -1 (ignored by the prompt encoder) when there is no error."""
    points, labels = [], []
    for pred, truth in zip(predicted.cpu().numpy(), masks.cpu().numpy(), strict=True):
        rows, cols = np.nonzero(pred != truth)
        if len(rows) == 0:
            points.append((0.0, 0.0))
            labels.append(-1)
            continue
        pick = int(rng.integers(len(rows)))
        points.append((cols[pick] + 0.5, rows[pick] + 0.5))
        labels.append(1 if truth[rows[pick], cols[pick]] else 0)
    xy = torch.tensor(np.array(points)[:, None, :] * scale, dtype=torch.float32)
    return xy, torch.tensor(labels, dtype=torch.int64)[:, None]
