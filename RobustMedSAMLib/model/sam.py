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
from torch import nn

from RobustMedSAMLib.model.config import ModelConfig
from RobustMedSAMLib.model.image_encoder import ImageEncoder
from RobustMedSAMLib.model.paired_decoding import FirstLayer, first_layer_image_side
from RobustMedSAMLib.model.robust_decoder import RobustMaskDecoder
from RobustMedSAMLib.model.sam_parts import MaskDecoder, PromptEncoder, TwoWayTransformer
from RobustMedSAMLib.model.tiny_vit import TinyViTEncoder


@dataclass
class ImageFeatures:
    """What the decoder needs from one image; computed once per slice, reused per click.

    embedding: ``1 x C x h x w``; robust: ``1 x C/8 x 4h x 4w`` fused robust features
    (robust decoder only, else None); first_layer: the robust decoder's transformer's
    image-only projections (three ``1 x hw x C/2``, see
    ``paired_decoding.first_layer_image_side``), used by clicks without a mask prompt;
    None: computed per click.
    """

    embedding: torch.Tensor
    robust: torch.Tensor | None = None
    first_layer: FirstLayer | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ImageFeatures:
        robust = None if self.robust is None else self.robust.to(device, dtype)
        first = self.first_layer
        first = None if first is None else tuple(t.to(device, dtype) for t in first)
        return ImageFeatures(self.embedding.to(device, dtype), robust, first)

    @property
    def nbytes(self) -> int:
        tensors = [self.embedding] + ([self.robust] if self.robust is not None else [])
        tensors += list(self.first_layer or ())
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
        self._dense_pe: tuple[tuple, torch.Tensor] | None = None  # (key of the weights, PE)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def encode(self, images: torch.Tensor) -> ImageFeatures:
        """images: ``1 x 3 x S x S`` model input (already normalised and padded)."""
        if not self.robust:
            return ImageFeatures(self.image_encoder(images))
        embedding, early = self.image_encoder.forward_with_early(images)
        decoder = self.mask_decoder
        no_mask = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        first = first_layer_image_side(decoder.transformer, embedding + no_mask, self.dense_pe())
        return ImageFeatures(embedding, decoder.robust_image_features(embedding, early), first)

    def features_numel(self) -> int:
        """Elements of the :class:`ImageFeatures` that :meth:`encode` gives, the same for
        every image (it enters at ``S x S``), so known before one is encoded: the
        embedding ``C x E x E``; with the robust decoder also its fused features
        ``C/8 x 4E x 4E`` and layer 0's three image-side projections ``E² x C'`` each."""
        size, width = self.config.embedding_size, self.config.prompt_embed_dim
        numel = width * size * size
        if self.robust:
            layer = self.mask_decoder.transformer.layers[0]
            to_image, to_token = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
            projections = (to_image.k_proj, to_image.v_proj, to_token.q_proj)
            numel += width // 8 * (4 * size) ** 2
            numel += size * size * sum(p.out_features for p in projections)
        return numel

    def dense_pe(self) -> torch.Tensor:
        """The prompt encoder's positional encoding of the embedding grid ``1 x C x h x w``:
        it depends on neither image nor prompt, so in inference it is computed once (again
        when its weights change or move); in training and under autocast, every call."""
        if self.training or torch.is_autocast_enabled(self.device.type):
            return self.prompt_encoder.get_dense_pe()
        gaussian = self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        key = (gaussian.device, gaussian.data_ptr(), gaussian._version)
        if self._dense_pe is None or self._dense_pe[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # a plain tensor, reusable
                self._dense_pe = key, self.prompt_encoder.get_dense_pe()
        return self._dense_pe[1]

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
            image_pe=self.dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        if self.robust:  # a mask prompt changes what the transformer's layer 0 sees
            first = features.first_layer if mask_input is None else None
            return self.mask_decoder(**args, robust_features=features.robust, first_layer=first)
        return self.mask_decoder(**args)
