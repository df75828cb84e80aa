"""One training step: model inputs and low-res targets of a split, and the forward
that turns a batch into its losses (features, iterative prompting, alignment).

Frames: model inputs ``B x 3 x S x S``; targets and logits on the decoder's low-res
grid ``L x L`` (model-input frame / 4); prompt coordinates in model-input pixels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from RobustMedSAMLib.inference.preprocessing import LONGEST_SIDE_STYLES, Preprocessor
from RobustMedSAMLib.model.sam import SegmentAnythingModel
from RobustMedSAMLib.training.config import TrainingConfig
from RobustMedSAMLib.training.data import SliceSet, variant_image, variant_spec
from RobustMedSAMLib.training.decoding import decode_paired
from RobustMedSAMLib.training.losses import (
    alignment_loss,
    distillation_loss,
    mask_losses,
    multimask_losses,
)
from RobustMedSAMLib.training.simulated_prompts import (
    Prompts,
    boxes_from_masks,
    correction_points,
    initial_prompts,
    points_in_masks,
)


class Inputs:
    """Model inputs and low-res targets for one split (images, corrupted variants)."""

    def __init__(self, data: SliceSet, config: TrainingConfig, model: SegmentAnythingModel):
        self.data = data
        self.config = config
        mc = model.config
        self.size, self.low = mc.image_size, mc.low_res_size
        self.pre = Preprocessor(
            config.model.preprocessing, mc.image_size, mc.pixel_mean, mc.pixel_std
        )
        self.firsts, self.rows = data.image_rows()
        self.replaced: dict[int, torch.Tensor] = {}  # low-res targets set by the trainer

    def model_input(self, index: int, variant: int) -> torch.Tensor:
        """``1 x 3 x S x S`` input of sample ``index``'s image, variant 0 clean or 1..
        corrupted (the variant is drawn per distinct image: samples sharing one image
        share its corrupted versions and their cached encoder outputs)."""
        first = self.firsts[self.rows[index]]
        spec = variant_spec(self.config.corruption, self.config.train.seed, first, variant)
        return self.pre.image(variant_image(self.data.images[index], spec))[0]

    def target(self, index: int) -> torch.Tensor:
        """``L x L`` bool mask on the decoder's low-res grid (model-input frame / 4)."""
        if index in self.replaced:
            return self.replaced[index]
        mask = self.data.masks[index]
        rows, cols = mask.shape
        if self.config.model.preprocessing in LONGEST_SIDE_STYLES:
            scale = self.size / max(rows, cols)
            inner = (
                round(rows * scale * self.low / self.size),
                round(cols * scale * self.low / self.size),
            )
        else:
            inner = (self.low, self.low)
        resized = F.interpolate(torch.from_numpy(mask)[None, None].float(), inner, mode="area")[
            0, 0
        ]
        return F.pad(resized >= 0.5, (0, self.low - inner[1], 0, self.low - inner[0]))

    def targets(self, indices: list[int]) -> torch.Tensor:
        return torch.stack([self.target(i) for i in indices])


class TrainStep(nn.Module):
    """One forward: features (cached or from the encoder), iterative prompting, losses.
    A module so that DDP can wrap it. teacher: the starting mask decoder, frozen (for
    ``loss.distill``)."""

    def __init__(
        self,
        model: SegmentAnythingModel,
        config: TrainingConfig,
        encoder_trains: bool,
        teacher: nn.Module | None = None,
    ):
        super().__init__()
        self.model = model
        self.config = config
        self.encoder_trains = encoder_trains
        self.teacher = teacher

    def image_features(self, source: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embedding ``B x C x h x w``, robust features or None) from ``images`` or the
        cached ``embedding`` + ``early``."""
        return self._features(source, self.model.mask_decoder)

    def _features(
        self, source: dict, decoder: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``image_features`` with the robust blocks of ``decoder``."""
        model = self.model
        if "images" in source:
            with torch.set_grad_enabled(self.encoder_trains and torch.is_grad_enabled()):
                embedding, early = model.image_encoder.forward_with_early(source["images"])
        else:
            embedding, early = source["embedding"], source.get("early")
        if not model.robust:
            return embedding, None
        if "robust" in source:  # cached output of frozen robust feature blocks
            return embedding, source["robust"]
        return embedding, decoder.robust_image_features(embedding, early)

    @torch.no_grad()
    def teacher_logits(self, clean: dict, prompts: Prompts) -> torch.Tensor:
        """``B x L x L`` single-mask logits of the teacher decoder on the clean images."""
        self.teacher.eval()
        embedding, robust = self._features(clean, self.teacher)
        logits, _, _ = decode_paired(self.model, embedding, robust, prompts, decoder=self.teacher)
        return logits

    def forward(
        self,
        source: dict,
        clean: dict | None,
        masks: torch.Tensor,
        corrupted: torch.Tensor,
        rng: np.random.Generator,
        sample_rngs: list[np.random.Generator] | None = None,
        weight: float = 1.0,
        align_weight: float = 1.0,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, its terms) of a batch ``B``: masks ``B x L x L``, corrupted ``B`` bool.

        rng draws the batch-wide choice (box or points); sample_rngs (one per sample,
        default: rng for all) draw each sample's jitter, points and corrections, so a
        sample gets the same prompts whichever process holds it. weight scales the mask
        terms and align_weight the alignment term (a rank's share of the global mean).
        """
        cfg = self.config
        scale = self.model.config.image_size / self.model.config.low_res_size
        embedding, robust = self.image_features(source)
        prompts = _initial_prompts(masks, rng, sample_rngs, cfg.prompts, scale).to(masks.device)
        mask_input, terms, align = None, {}, None
        rounds = cfg.prompts.corrections + 1
        for round_ in range(rounds):
            multimask = round_ == 0 and cfg.prompts.multimask and prompts.is_lone_point
            logits, iou, features = decode_paired(
                self.model, embedding, robust, prompts, mask_input, multimask
            )
            if multimask:
                losses, logits = multimask_losses(logits, iou, masks, cfg.loss)
            else:
                losses = mask_losses(logits, iou, masks, cfg.loss)
            for name, value in losses.items():
                terms[name] = terms.get(name, 0.0) + value * (weight / rounds)
            distill = round_ == 0 and clean is not None and prompts.boxes is not None
            if distill and cfg.loss.distill > 0 and self.teacher is not None:
                terms["distill"] = (cfg.loss.distill * weight) * distillation_loss(
                    logits, self.teacher_logits(clean, prompts)
                )
            if round_ == 0 and clean is not None and cfg.loss.align > 0:
                # every rank runs the clean pass when the global batch has a corrupted
                # sample (BatchNorm statistics are taken over all ranks)
                with torch.no_grad():
                    clean_embedding, clean_robust = self.image_features(clean)
                    _, _, clean_features = decode_paired(
                        self.model, clean_embedding, clean_robust, prompts
                    )
                if bool(corrupted.any()):
                    align = (cfg.loss.align * align_weight) * alignment_loss(
                        features[corrupted], clean_features[corrupted]
                    )
                else:  # none in this rank's share: a zero term
                    align = features.sum() * 0.0
            if round_ + 1 < rounds:
                xy, labels = _correction_points(logits.detach() > 0, masks, rng, sample_rngs, scale)
                prompts = prompts.add_points(xy.to(masks.device), labels.to(masks.device))
                mask_input = logits.detach()[:, None]
        if align is not None:
            terms["align"] = align
        total = sum(terms.values())
        return total, {k: float(v.detach()) for k, v in terms.items()}


def _initial_prompts(masks, rng, sample_rngs, section, scale) -> Prompts:
    """``initial_prompts`` with each sample's draws from its own generator (when given)."""
    if sample_rngs is None:
        return initial_prompts(masks, rng, section, scale)
    if rng.random() < section.box_probability:
        boxes = [boxes_from_masks(masks[i : i + 1], r, section.box_jitter, scale)
                 for i, r in enumerate(sample_rngs)]  # fmt: skip
        return Prompts(None, None, torch.cat(boxes))
    pairs = [points_in_masks(masks[i : i + 1], r, section.points, scale)
             for i, r in enumerate(sample_rngs)]  # fmt: skip
    return Prompts(torch.cat([p for p, _ in pairs]), torch.cat([q for _, q in pairs]), None)


def _correction_points(predicted, masks, rng, sample_rngs, scale):
    """``correction_points`` with each sample's draw from its own generator (when given)."""
    if sample_rngs is None:
        return correction_points(predicted, masks, rng, scale)
    pairs = [correction_points(predicted[i : i + 1], masks[i : i + 1], r, scale)
             for i, r in enumerate(sample_rngs)]  # fmt: skip
    return torch.cat([p for p, _ in pairs]), torch.cat([q for _, q in pairs])


def learning_rate(config: TrainingConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_fraction`` x lr at the last step."""
    t = config.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    floor = t.min_lr_fraction
    return t.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
