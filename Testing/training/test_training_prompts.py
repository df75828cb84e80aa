"""Simulated prompts and training losses."""

from __future__ import annotations

import numpy as np
import torch

from RobustMedSAMLib.training.config import LossSection, PromptSection
from RobustMedSAMLib.training.losses import dice_score, mask_losses, multimask_losses
from RobustMedSAMLib.training.simulated_prompts import (
    boxes_from_masks,
    correction_points,
    initial_prompts,
)


def _masks() -> torch.Tensor:
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, 4:12, 10:20] = True
    masks[1, 20:30, 2:8] = True
    return masks


def test_boxes_enclose_the_mask_and_jitter_stays_bounded():
    masks = _masks()
    tight = boxes_from_masks(masks, np.random.default_rng(0), 0.0, scale=4.0)
    assert tight[0].tolist() == [40.0, 16.0, 80.0, 48.0]  # (x0, y0, x1, y1) model pixels
    jittered = boxes_from_masks(masks, np.random.default_rng(0), 0.2, scale=4.0)
    size = (tight[:, 2:] - tight[:, :2]).repeat(1, 2)
    assert (jittered - tight).abs().le(0.2 * size + 1e-4).all()
    assert not torch.equal(jittered, tight)


def test_initial_points_lie_inside_the_masks():
    masks = _masks()
    section = PromptSection(box_probability=0.0, points=3)
    prompts = initial_prompts(masks, np.random.default_rng(1), section, scale=4.0)
    assert prompts.boxes is None and prompts.points.shape == (2, 3, 2)
    assert (prompts.labels == 1).all()
    for b in range(2):
        cols, rows = (prompts.points[b] / 4.0).floor().long().T
        assert masks[b, rows, cols].all()


def test_correction_points_come_from_the_error_region_with_the_right_label():
    masks = _masks()
    predicted = masks.clone()
    predicted[0, 4:12, 15:20] = False  # missed part -> positive point there
    predicted[1, 0:3, 0:3] = True  # false detection -> negative point there
    xy, labels = correction_points(predicted, masks, np.random.default_rng(2), scale=4.0)
    assert labels[:, 0].tolist() == [1, 0]
    col, row = (xy[0, 0] / 4).long().tolist()
    assert 4 <= row < 12 and 15 <= col < 20
    col, row = (xy[1, 0] / 4).long().tolist()
    assert row < 3 and col < 3
    _, none = correction_points(masks, masks, np.random.default_rng(2), scale=4.0)
    assert (none == -1).all()


def test_losses_are_small_for_the_right_mask_and_large_for_the_wrong_one():
    masks = _masks()
    good = masks.float() * 20 - 10
    bad = -good
    iou = torch.ones(2)
    weights = LossSection(focal=1.0)
    right = mask_losses(good, iou, masks, weights)
    wrong = mask_losses(bad, iou, masks, weights)
    assert set(right) == {"dice", "bce", "focal", "iou"}
    for key in right:
        assert right[key] < 0.01 < wrong[key]
    assert dice_score(good, masks).tolist() == [1.0, 1.0]


def test_a_lone_point_trains_the_best_of_three_candidates_and_scores_all():
    masks = _masks()
    good, bad = masks.float() * 20 - 10, -(masks.float() * 20 - 10)
    # sample 0: candidate 2 is right; sample 1: candidate 0 is right
    logits = torch.stack(
        [torch.stack([bad[0], bad[0], good[0]]), torch.stack([good[1], bad[1], bad[1]])]
    )
    logits.requires_grad_(True)
    iou = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], requires_grad=True)
    weights = LossSection()
    terms, chosen = multimask_losses(logits, iou, masks, weights)
    assert torch.equal(chosen.detach(), torch.stack([good[0], good[1]]))
    assert terms["dice"] < 0.01 and terms["bce"] < 0.01
    assert terms["iou"] < 1e-6  # every candidate's score equals its true IoU (1 or 0)
    sum(terms.values()).backward()
    assert logits.grad[0, 2].abs().sum() > 0 and logits.grad[0, :2].abs().sum() == 0
    wrong_scores = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    assert multimask_losses(logits, wrong_scores, masks, weights)[0]["iou"] > 0.9
