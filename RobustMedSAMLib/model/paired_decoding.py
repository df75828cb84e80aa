"""Mask decoding with one image per prompt set (training batches of different images).

SAM's ``MaskDecoder.predict_masks`` takes one image and repeats it for every prompt;
training decodes ``B`` images with ``B`` prompt sets. ``paired_tokens`` is the shared
part (tokens, two-way transformer, upscaling) for the plain decoder here and the robust
one in ``robust_decoder``. Frames: embeddings ``B x C x h x w``; masks on the low-res grid
``B x M x 4h x 4w``.
"""

from __future__ import annotations

import torch
from torch import nn


def paired_tokens(
    decoder: nn.Module,
    token_weights: torch.Tensor,
    embedding: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(IoU token ``B x C``, mask tokens ``B x M x C``, upscaled features ``B x C/8 x 4h x 4w``)
    after the decoder's transformer; ``token_weights`` ``(1 + M) x C`` (IoU, mask tokens)."""
    batch = sparse.size(0)
    tokens = torch.cat([token_weights.unsqueeze(0).expand(batch, -1, -1), sparse], dim=1)
    src = embedding + dense
    b, c, h, w = src.shape
    hs, src = decoder.transformer(src, image_pe.expand(b, -1, -1, -1), tokens)
    upscaled = decoder.output_upscaling(src.transpose(1, 2).view(b, c, h, w))
    return hs[:, 0, :], hs[:, 1 : 1 + decoder.num_mask_tokens, :], upscaled


def masks_from(hyper_in: torch.Tensor, upscaled: torch.Tensor) -> torch.Tensor:
    """Mask logits ``B x M x H x W`` from hypernetwork outputs ``B x M x C'`` and features."""
    b, c, h, w = upscaled.shape
    return (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)


def plain_paired(
    decoder: nn.Module,
    embedding: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SAM's plain decoder, one image per prompt: (logits ``B x 4 x L x L``, IoU ``B x 4``,
    mask features ``B x C/8 x L x L``)."""
    weights = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    iou_out, mask_out, upscaled = paired_tokens(
        decoder, weights, embedding, image_pe, sparse, dense
    )
    hyper_in = torch.stack(
        [mlp(mask_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
    )
    return masks_from(hyper_in, upscaled), decoder.iou_prediction_head(iou_out), upscaled
