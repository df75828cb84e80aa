"""Mask decoding with one image per prompt set (training batches of different images).

SAM's ``MaskDecoder.predict_masks`` takes one image and repeats it for every prompt;
training decodes ``B`` images with ``B`` prompt sets. ``paired_tokens`` is the shared
part (tokens, two-way transformer, upscaling) for the plain decoder here and the robust
one in ``robust_decoder``. Frames: embeddings ``B x C x h x w``; masks on the low-res grid
``B x M x 4h x 4w``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

FirstLayer = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""Layer 0's image-only projections, each ``1 x hw x C'`` (see ``first_layer_image_side``)."""


def paired_tokens(
    decoder: nn.Module,
    token_weights: torch.Tensor,
    embedding: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    first_layer: FirstLayer | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(IoU token ``B x C``, mask tokens ``B x M x C``, upscaled features ``B x C/8 x 4h x 4w``)
    after the decoder's transformer; ``token_weights`` ``(1 + M) x C`` (IoU, mask tokens).
    ``first_layer``: layer 0's image-side projections of ``embedding + dense``, cached per
    slice (valid only while ``dense`` is the no-mask embedding), or None to compute them."""
    batch = sparse.size(0)
    tokens = torch.cat([token_weights.unsqueeze(0).expand(batch, -1, -1), sparse], dim=1)
    src = embedding + dense
    b, c, h, w = src.shape
    if first_layer is None:
        hs, src = decoder.transformer(src, image_pe.expand(b, -1, -1, -1), tokens)
    else:
        hs, src = two_way_cached(decoder.transformer, src, image_pe, tokens, first_layer)
    upscaled = decoder.output_upscaling(src.transpose(1, 2).view(b, c, h, w))
    return hs[:, 0, :], hs[:, 1 : 1 + decoder.num_mask_tokens, :], upscaled


def first_layer_image_side(
    transformer: nn.Module, src: torch.Tensor, image_pe: torch.Tensor
) -> FirstLayer:
    """What layer 0 of SAM's two-way transformer computes from the image alone: the keys
    and values of its token-to-image attention and the queries of its image-to-token
    attention, each ``1 x hw x C'``. ``src``: the embedding plus the no-mask dense
    embedding ``1 x C x h x w``; ``image_pe``: ``1 x C x h x w``. A mask prompt changes
    ``src``, so these hold for box and point prompts without a mask only."""
    keys = src.flatten(2).permute(0, 2, 1)
    keyed = keys + image_pe.flatten(2).permute(0, 2, 1)
    layer = transformer.layers[0]
    to_image, to_token = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    return to_image.k_proj(keyed), to_image.v_proj(keys), to_token.q_proj(keyed)


def _attend(attention: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """SAM's ``Attention`` after its input projections: q, k, v ``B x N x C'`` (projected)
    -> ``B x Nq x C``, the same operations in the same order."""
    heads = attention.num_heads

    def split(x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, heads, c // heads).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    attn = torch.softmax(q @ k.permute(0, 1, 3, 2) / math.sqrt(q.shape[-1]), dim=-1)
    out = (attn @ v).transpose(1, 2)
    return attention.out_proj(out.reshape(out.shape[0], out.shape[1], -1))


def two_way_cached(
    transformer: nn.Module,
    src: torch.Tensor,
    image_pe: torch.Tensor,
    tokens: torch.Tensor,
    first_layer: FirstLayer,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's ``TwoWayTransformer.forward`` (tokens ``B x N x C``, image ``1 x C x h x w``)
    with layer 0's image-side projections taken from ``first_layer``: (tokens
    ``B x N x C``, image keys ``B x hw x C``), equal to the uncached forward."""
    keys = src.flatten(2).permute(0, 2, 1)
    key_pe = image_pe.flatten(2).permute(0, 2, 1)
    keys_k, keys_v, keys_q = first_layer
    layer = transformer.layers[0]  # SAM skips the positional encoding in its self-attention
    queries = layer.norm1(layer.self_attn(q=tokens, k=tokens, v=tokens))
    to_image = layer.cross_attn_token_to_image
    attended = _attend(to_image, to_image.q_proj(queries + tokens), keys_k, keys_v)
    queries = layer.norm2(queries + attended)
    queries = layer.norm3(queries + layer.mlp(queries))
    to_token, q = layer.cross_attn_image_to_token, queries + tokens
    attended = _attend(to_token, keys_q, to_token.k_proj(q), to_token.v_proj(queries))
    keys = layer.norm4(keys + attended)
    for later in transformer.layers[1:]:
        queries, keys = later(queries=queries, keys=keys, query_pe=tokens, key_pe=key_pe)
    final = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + key_pe, v=keys)
    return transformer.norm_final_attn(queries + final), keys


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
