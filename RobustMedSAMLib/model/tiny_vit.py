"""LiteMedSAM's image encoder: a full-resolution TinyViT built from timm's TinyViT blocks.

LiteMedSAM (the MedSAM authors' distilled model) uses MobileSAM's TinyViT changed to keep
detail: a 1 x 1 convolution stem (no stride) and a last merge of stride 1. For an
``S x S`` input (S = 256) the stages run at S, S/2, S/4, S/4 pixels with 64, 128, 160
and 320 channels; SAM's neck maps the last stage to ``256 x S/4 x S/4`` (64 x 64).

timm provides the blocks (``MBConv``, ``TinyVitBlock`` with its windowed attention and
attention-bias table, ``ConvNorm``); the stem, the merges, the stage order and the neck
are ours. The state dict keeps the published checkpoint's names: timm calls a
``ConvNorm``'s convolution ``conv`` where the checkpoint says ``c``, and two hooks map
one to the other on save and load (see ``OURS`` and ``PUBLISHED``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from segment_anything.modeling.common import LayerNorm2d
from timm.models.tiny_vit import Attention, ConvNorm, MBConv, TinyVitBlock
from torch import nn

OURS, PUBLISHED = ".conv.weight", ".c.weight"
"""Key endings: timm's ``ConvNorm.conv`` is the published ``Conv2d_BN.c``."""


class Merge(nn.Module):
    """Patch merging: 1x1 conv, 3x3 depthwise conv of ``stride``, 1x1 conv (BCHW in and out)."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(dim, out_dim, 1, 1, 0)
        self.conv2 = ConvNorm(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = ConvNorm(out_dim, out_dim, 1, 1, 0)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))


class Stage(nn.Module):
    """Blocks at one resolution, then an optional merge. ``B x C x H x W`` in and out."""

    def __init__(self, blocks: list[nn.Module], downsample: Merge | None, channels_last: bool):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample
        self.channels_last = channels_last  # TinyVitBlock works on B x H x W x C

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = self.blocks(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        else:
            x = self.blocks(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViTEncoder(nn.Module):
    """LiteMedSAM's TinyViT: ``B x 3 x S x S`` in [0, 1] -> ``B x 256 x S/4 x S/4``."""

    def __init__(
        self,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        out_chans: int = 256,
    ) -> None:
        super().__init__()
        first = embed_dims[0]
        self.patch_embed = nn.Module()
        self.patch_embed.seq = nn.Sequential(
            ConvNorm(3, first // 2, 1, 1, 0), nn.GELU(), ConvNorm(first // 2, first, 1, 1, 0)
        )
        self.layers = nn.ModuleList()
        last = len(depths) - 1
        for i, depth in enumerate(depths):
            dim = embed_dims[i]
            merge = None
            if i < last:  # the merge into the last stage keeps the resolution
                merge = Merge(dim, embed_dims[i + 1], stride=1 if i + 1 == last else 2)
            if i == 0:
                blocks = [MBConv(dim, dim, 4.0, nn.GELU, 0.0) for _ in range(depth)]
            else:
                blocks = [
                    TinyVitBlock(dim, num_heads[i], window_sizes[i], mlp_ratio=4.0)
                    for _ in range(depth)
                ]
            self.layers.append(Stage(blocks, merge, channels_last=i > 0))
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.register_state_dict_post_hook(_to_checkpoint_names)
        self.register_load_state_dict_pre_hook(_from_checkpoint_names)

    def forward_with_early(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: ``B x 3 x S x S`` (min-max scaled to [0, 1], zero-padded).

        Returns the embedding ``B x 256 x S/4 x S/4`` and the early features that a robust
        decoder could consume: the input of the third stage, ``B x S/4 x S/4 x 160``
        (channels last, as ``ImageEncoder.forward_with_early`` gives them).
        """
        x = self.patch_embed.seq(x)
        early = x
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index == 1:
                early = x.permute(0, 2, 3, 1)
        return self.neck(x), early

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_early(x)[0]


def _rename(state: dict, prefix: str, old: str, new: str) -> None:
    """Rename keys under ``prefix`` ending in ``old`` to end in ``new``, keeping the order."""
    for key in list(state):
        value = state.pop(key)
        if key.startswith(prefix) and key.endswith(old):
            key = key[: -len(old)] + new
        state[key] = value


def _to_checkpoint_names(module: nn.Module, state: dict, prefix: str, metadata: dict) -> None:
    _rename(state, prefix, OURS, PUBLISHED)


def _from_checkpoint_names(module: nn.Module, state: dict, prefix: str, *args) -> None:
    _rename(state, prefix, PUBLISHED, OURS)
    for child in module.modules():  # new weights: drop timm's cached attention biases
        if isinstance(child, Attention):
            child.attention_bias_cache = {}
