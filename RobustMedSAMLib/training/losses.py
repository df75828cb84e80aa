"""Training losses: Dice + BCE (or focal) on mask logits, IoU-prediction MSE, and the
clean-degraded feature alignment term. Masks and logits are ``B x L x L`` (low-res)."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from RobustMedSAMLib.training.config import LossSection

# every term a step can report: the mask terms, the clean/corrupted alignment, distillation
LOSS_TERMS = ("dice", "bce", "focal", "iou", "align", "distill")


def dice_loss(logits: torch.Tensor, masks: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per sample, averaged over the batch."""
    return _dice_losses(logits, masks, eps).mean()


def _dice_losses(logits: torch.Tensor, masks: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice of each sample, ``B`` values."""
    probs = torch.sigmoid(logits).flatten(1)
    target = masks.float().flatten(1)
    dice = (2 * (probs * target).sum(1) + eps) / (probs.sum(1) + target.sum(1) + eps)
    return 1 - dice


def focal_loss(logits: torch.Tensor, masks: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss (alpha 0.25), as SAM was trained."""
    return _focal_map(logits, masks, gamma).mean()


def _focal_map(logits: torch.Tensor, masks: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """The focal loss of every pixel (alpha 0.25)."""
    target = masks.float()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = torch.exp(-ce)
    alpha = 0.25 * target + 0.75 * (1 - target)
    return alpha * (1 - p_t) ** gamma * ce


def hard_iou(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """IoU of the thresholded prediction with the truth, ``B`` values (no gradient)."""
    pred = (logits.detach() > 0).flatten(1)
    truth = masks.flatten(1).bool()
    union = (pred | truth).sum(1).clamp(min=1)
    return (pred & truth).sum(1).float() / union


def dice_score(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Dice of the thresholded prediction, ``B`` values (1 when both are empty)."""
    pred = (logits.detach() > 0).flatten(1)
    truth = masks.flatten(1).bool()
    total = pred.sum(1) + truth.sum(1)
    return torch.where(total > 0, 2 * (pred & truth).sum(1) / total.clamp(min=1), 1.0)


def mask_losses(
    logits: torch.Tensor, iou_pred: torch.Tensor, masks: torch.Tensor, weights: LossSection
) -> dict[str, torch.Tensor]:
    """The weighted terms for one prediction; logits ``B x L x L``, iou_pred ``B``."""
    terms: dict[str, torch.Tensor] = {}
    if weights.dice:
        terms["dice"] = weights.dice * dice_loss(logits, masks)
    if weights.bce:
        terms["bce"] = weights.bce * F.binary_cross_entropy_with_logits(logits, masks.float())
    if weights.focal:
        terms["focal"] = weights.focal * focal_loss(logits, masks)
    if weights.iou:
        terms["iou"] = weights.iou * F.mse_loss(iou_pred, hard_iou(logits, masks))
    return terms


def multimask_losses(
    logits: torch.Tensor, iou_pred: torch.Tensor, masks: torch.Tensor, weights: LossSection
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """SAM's training for an ambiguous prompt (a lone point): ``logits`` ``B x M x L x L``
    candidates, ``iou_pred`` ``B x M``. The mask terms of each sample's best candidate
    (lowest Dice + BCE/focal), the IoU term on every candidate, so that the score that
    picks among them at inference is trained. Returns (terms, best logits ``B x L x L``)."""
    batch, count = logits.shape[:2]
    flat, repeated = logits.flatten(0, 1), masks.repeat_interleave(count, 0)
    with torch.no_grad():
        best = _sample_losses(flat, repeated, weights).view(batch, count).argmin(1)
    rows = torch.arange(batch, device=logits.device)
    chosen = logits[rows, best]
    terms = mask_losses(chosen, iou_pred[rows, best], masks, replace(weights, iou=0.0))
    if weights.iou:
        terms["iou"] = weights.iou * F.mse_loss(iou_pred.flatten(), hard_iou(flat, repeated))
    return terms, chosen


def _sample_losses(logits: torch.Tensor, masks: torch.Tensor, w: LossSection) -> torch.Tensor:
    """Weighted Dice + BCE + focal of each sample, ``B`` values (to rank candidates)."""
    bce = F.binary_cross_entropy_with_logits(logits, masks.float(), reduction="none")
    total = w.dice * _dice_losses(logits, masks) + w.bce * bce.flatten(1).mean(1)
    if w.focal:
        total = total + w.focal * _focal_map(logits, masks).flatten(1).mean(1)
    return total


def alignment_loss(degraded: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """MSE between the decoder's mask features on a corrupted image and on its clean
    version (the clean side is a fixed target)."""
    return F.mse_loss(degraded, clean.detach())


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """BCE of ``logits`` against the teacher's probabilities (both ``B x L x L``)."""
    return F.binary_cross_entropy_with_logits(logits, torch.sigmoid(teacher_logits.detach()))
