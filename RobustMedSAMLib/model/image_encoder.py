"""SAM's ViT image encoder, made faster and able to hand out its early features.

Parameters and their names are exactly ``segment_anything``'s (so published
checkpoints load unchanged); two things differ:

* attention runs through ``torch.nn.functional.scaled_dot_product_attention``
  with SAM's decomposed relative-position term passed as the additive mask
  (same result to float tolerance, faster on CPU and GPU);
* ``forward_with_early`` also returns the output of the first global-attention
  block (block 2 in ViT-B), which RobustSAM's decoder consumes.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from RobustMedSAMLib.model.config import ModelConfig
from RobustMedSAMLib.model.sam_parts import Attention, ImageEncoderViT, get_rel_pos


class SdpaAttention(Attention):
    """SAM's windowed/global attention computed with fused scaled-dot-product attention."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``B x H x W x C`` tokens -> same shape."""
        B, H, W, _ = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(B, H * W, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * heads, H * W, -1).unbind(0)
        bias = self._rel_pos_bias(q, H, W) if self.use_rel_pos else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.view(B, heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(out)

    def _rel_pos_bias(self, q: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """SAM's decomposed relative-position term as a ``(B*heads) x HW x HW`` mask."""
        Rh = get_rel_pos(H, H, self.rel_pos_h).to(q.dtype)
        Rw = get_rel_pos(W, W, self.rel_pos_w).to(q.dtype)
        r_q = q.reshape(q.shape[0], H, W, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)
        return (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(q.shape[0], H * W, H * W)


class ImageEncoder(ImageEncoderViT):
    """SAM's ViT encoder with fused attention and access to early features."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(
            depth=config.encoder_depth,
            embed_dim=config.encoder_embed_dim,
            img_size=config.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=config.encoder_num_heads,
            patch_size=config.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=config.encoder_global_attn_indexes,
            window_size=config.window_size,
            out_chans=config.prompt_embed_dim,
        )
        for block in self.blocks:
            block.attn.__class__ = SdpaAttention  # same parameters, faster forward
        self.first_global_block = config.first_global_block

    def forward_with_early(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: ``B x 3 x S x S`` normalised, padded images.

        Returns the embedding ``B x C x S/16 x S/16`` and the first global block's
        output ``B x S/16 x S/16 x D`` (D = encoder width), as RobustSAM's encoder does.
        """
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        early = x
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index == self.first_global_block:
                early = x
        return self.neck(x.permute(0, 3, 1, 2)), early

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_early(x)[0]
