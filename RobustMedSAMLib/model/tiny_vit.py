"""LiteMedSAM's image encoder: a full-resolution TinyViT.

LiteMedSAM (the MedSAM authors' distilled model) uses MobileSAM's TinyViT changed to keep
detail: a 1 x 1 convolution stem (no stride) and a last merge of stride 1. For an
``S x S`` input (S = 256) the stages run at S, S/2, S/4, S/4 pixels with 64, 128, 160
and 320 channels; SAM's neck maps the last stage to ``256 x S/4 x S/4`` (64 x 64).

The blocks are written here (convolution + batch norm, the inverted-residual
``MBConv`` of the first stage, the windowed-attention block of the others with its
learnt bias per head and window offset). They were timm's until the process's memory
was measured: importing ``timm`` imports torchvision, 0.18 GB resident for nothing the
encoder uses (see docs/evidence.md, Memory). Submodule names are the published
checkpoint's, so it loads as it is; the conformance test compares the outputs with the
reference package's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from RobustMedSAMLib.model.sam_parts import LayerNorm2d


class ConvNorm(nn.Module):
    """A convolution without bias, then batch norm (the checkpoint's ``c`` and ``bn``)."""

    def __init__(
        self, dim: int, out_dim: int, kernel: int = 1, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        self.c = nn.Conv2d(dim, out_dim, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(x))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (x4), 3x3 depthwise, 1x1 project, add, GELU (BCHW)."""

    def __init__(self, dim: int, expand: int = 4) -> None:
        super().__init__()
        hidden = dim * expand
        self.conv1 = ConvNorm(dim, hidden)
        self.conv2 = ConvNorm(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvNorm(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(x + self.conv3(y))


class WindowAttention(nn.Module):
    """Multi-head self-attention within one ``window x window`` window (``B x N x C``),
    pre-normalised, with a learnt bias per head for each ``(|dy|, |dx|)`` offset."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(heads, window * window))
        # an explicit device: under ``torch.device("meta")`` (the loaders' shape check)
        # arange would go through torch's Python reference and import sympy (0.1 GB)
        places = torch.arange(window, device="cpu")
        rows, cols = (grid.flatten() for grid in torch.meshgrid(places, places, indexing="ij"))
        offset = (rows[:, None] - rows[None]).abs() * window + (cols[:, None] - cols[None]).abs()
        self.register_buffer("bias_index", offset, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(self.norm(x)).view(batch, tokens, self.heads, 3 * self.head_dim)
        q, k, v = qkv.transpose(1, 2).split(self.head_dim, dim=3)  # each B x heads x N x d
        bias = self.attention_biases[:, self.bias_index]  # heads x N x N
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class NormMlp(nn.Module):
    """LayerNorm, then a two-layer GELU MLP (``B x N x C``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class WindowBlock(nn.Module):
    """TinyViT's block on ``B x H x W x C``: windowed attention (the map zero-padded to
    whole windows), a 3x3 depthwise convolution, an MLP; residual around the first and
    the last."""

    def __init__(self, dim: int, heads: int, window: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, heads, window)
        self.local_conv = ConvNorm(dim, dim, 3, groups=dim)
        self.mlp = NormMlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._windowed_attention(x)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = x.shape
        w = self.window
        pad_rows, pad_cols = -height % w, -width % w
        if pad_rows or pad_cols:
            x = F.pad(x, (0, 0, 0, pad_cols, 0, pad_rows))
        rows, cols = (height + pad_rows) // w, (width + pad_cols) // w
        windows = x.view(batch, rows, w, cols, w, dim).transpose(2, 3).reshape(-1, w * w, dim)
        out = self.attn(windows).view(batch, rows, cols, w, w, dim).transpose(2, 3)
        return out.reshape(batch, rows * w, cols * w, dim)[:, :height, :width]


class Merge(nn.Module):
    """Patch merging: 1x1 conv, 3x3 depthwise conv of ``stride``, 1x1 conv (BCHW in and out)."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(dim, out_dim)
        self.conv2 = ConvNorm(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvNorm(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


class Stage(nn.Module):
    """Blocks at one resolution, then an optional merge. ``B x C x H x W`` in and out."""

    def __init__(self, blocks: list[nn.Module], downsample: Merge | None, channels_last: bool):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.downsample = downsample
        self.channels_last = channels_last  # WindowBlock works on B x H x W x C

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
            ConvNorm(3, first // 2), nn.GELU(), ConvNorm(first // 2, first)
        )
        self.layers = nn.ModuleList()
        last = len(depths) - 1
        for i, depth in enumerate(depths):
            dim = embed_dims[i]
            merge = None
            if i < last:  # the merge into the last stage keeps the resolution
                merge = Merge(dim, embed_dims[i + 1], stride=1 if i + 1 == last else 2)
            if i == 0:
                blocks = [MBConv(dim) for _ in range(depth)]
            else:
                blocks = [WindowBlock(dim, num_heads[i], window_sizes[i]) for _ in range(depth)]
            self.layers.append(Stage(blocks, merge, channels_last=i > 0))
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

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
