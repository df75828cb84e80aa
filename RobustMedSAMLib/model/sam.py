"""The SAM-family model: image encoder, prompt encoder, plain or robust mask decoder.

One class covers SAM ViT-B, MedSAM, MedicoSAM and LiteMedSAM (TinyViT encoder) with the
plain decoder, and RobustSAM, the fused MedSAM+RobustSAM model and RobustMedSAM-Lite
(TinyViT encoder) with the robust decoder;
parameter names are those of the
published checkpoints (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``).
Frames: images enter as ``B x 3 x S x S`` normalised model input; points and boxes
are in model-input pixels (x, y); masks leave as low-res logits (``4h x 4w``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from segment_anything.modeling.mask_decoder import MaskDecoder
from segment_anything.modeling.prompt_encoder import PromptEncoder
from segment_anything.modeling.transformer import TwoWayTransformer
from torch import nn

from RobustMedSAMLib.model.config import ModelConfig
from RobustMedSAMLib.model.image_encoder import ImageEncoder
from RobustMedSAMLib.model.robust_decoder import RobustMaskDecoder
from RobustMedSAMLib.model.tiny_vit import TinyViTEncoder


@dataclass
class ImageFeatures:
    """What the decoder needs from one image; computed once per slice, reused per click.

    embedding: ``1 x C x h x w``; robust: ``1 x C/8 x 4h x 4w`` fused robust features
    (robust decoder only, else None).
    """

    embedding: torch.Tensor
    robust: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ImageFeatures:
        robust = None if self.robust is None else self.robust.to(device, dtype)
        return ImageFeatures(self.embedding.to(device, dtype), robust)

    @property
    def nbytes(self) -> int:
        tensors = [self.embedding] + ([self.robust] if self.robust is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def _plain_decoder(config: ModelConfig) -> MaskDecoder:
    return MaskDecoder(
        transformer_dim=config.prompt_embed_dim,
        transformer=TwoWayTransformer(
            depth=config.decoder_depth,
            embedding_dim=config.prompt_embed_dim,
            mlp_dim=config.decoder_mlp_dim,
            num_heads=config.decoder_num_heads,
        ),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
    )


def _image_encoder(config: ModelConfig) -> nn.Module:
    return ImageEncoder(config) if config.encoder_kind == "vit" else TinyViTEncoder()


class SegmentAnythingModel(nn.Module):
    """Encoder + prompt encoder + (robust) decoder, with SAM's parameter names."""

    def __init__(self, config: ModelConfig, robust: bool) -> None:
        super().__init__()
        self.config = config
        self.robust = robust
        self.image_encoder = _image_encoder(config)
        self.prompt_encoder = PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(config.embedding_size, config.embedding_size),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans,
        )
        self.mask_decoder = RobustMaskDecoder(config) if robust else _plain_decoder(config)
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(-1, 1, 1), False)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def encode(self, images: torch.Tensor) -> ImageFeatures:
        """images: ``1 x 3 x S x S`` model input (already normalised and padded)."""
        if not self.robust:
            return ImageFeatures(self.image_encoder(images))
        embedding, early = self.image_encoder.forward_with_early(images)
        return ImageFeatures(embedding, self.mask_decoder.robust_image_features(embedding, early))

    def decode(
        self,
        features: ImageFeatures,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits ``B x M x 4h x 4w`` and predicted IoU ``B x M`` (M = 3 or 1).

        points: (``B x N x 2`` model-input pixels (x, y), ``B x N`` labels 1/0);
        boxes: ``B x 4`` (x0, y0, x1, y1) model-input pixels; mask_input: ``B x 1 x 4h x 4w``.
        """
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        args = dict(
            image_embeddings=features.embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        if self.robust:
            return self.mask_decoder(**args, robust_features=features.robust)
        return self.mask_decoder(**args)
