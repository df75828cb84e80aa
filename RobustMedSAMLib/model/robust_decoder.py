"""RobustSAM's mask decoder: SAM's decoder plus the robust output token path.

Parameter names and shapes are those of the published RobustSAM checkpoint
(``robustsam_checkpoint_b.pth``), so it loads unchanged. At inference the decoder
runs its robust path (RobustSAM's ``clear=False``):

* the early encoder features (first global-attention block) and the final image
  embedding pass through anti-degradation feature blocks (AMFG) and are fused;
* the decoder's upscaled mask features pass through the same kind of block;
* the robust output tokens pass through the token block (AOTG) and ``robust_mlp``.

Two facts of the published implementation are kept, because the published
weights were trained with them: its Fourier modulation block returns its input
unchanged (we keep its weights for the key layout and skip the dead FFT), and its
token block reads only the first quarter of each normalised token. Its reference
``predict`` is single-mask; our multimask output (tokens 1-3) equals the first
three masks of the reference's multimask slice.

The channel sizes follow the config: the early-feature block takes ``config.early_dim``
channels (768 for ViT-B's block 2, 160 for TinyViT's second stage), the others the
decoder width. With ``config.robust_residual`` (RobustMedSAM-Lite) the robust path keeps
the plain decoder's mask features and hypernetwork MLPs and adds the robust blocks'
outputs to them; ``init_residual_from_plain`` copies a plain decoder and zeroes the last
layer of every added branch, so that the untrained robust path gives the plain decoder's
masks exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from RobustMedSAMLib.model.config import ModelConfig
from RobustMedSAMLib.model.paired_decoding import FirstLayer, masks_from, paired_tokens
from RobustMedSAMLib.model.sam_parts import MLP, LayerNorm2d, MaskDecoder, TwoWayTransformer


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation over channels (RobustSAM's ``CABlock``)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.excitation = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.excitation(self.squeeze(x).flatten(1))
        return x * weights[:, :, None, None]


class Selector(nn.Module):
    """Two spatial soft-attention maps (4x4 grid, upsampled) choosing between branches."""

    grid = 4

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        features = channels * self.grid**2
        self.avg_pool = nn.AdaptiveAvgPool2d((self.grid, self.grid))
        self.fc = nn.Sequential(
            nn.Linear(features, features // reduction, bias=False), nn.ReLU(inplace=True)
        )
        self.att_conv1 = nn.Linear(features // reduction, features)
        self.att_conv2 = nn.Linear(features // reduction, features)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        y = self.fc(self.avg_pool(x).reshape(b, -1))
        shape = (b, c, self.grid, self.grid)
        attention = torch.stack((self.att_conv1(y).view(shape), self.att_conv2(y).view(shape)))
        attention = torch.softmax(attention, dim=0)
        att1 = F.interpolate(attention[0], size=(h, w), mode="nearest")
        att2 = F.interpolate(attention[1], size=(h, w), mode="nearest")
        return att1, att2


class SelectiveConv(nn.Module):
    """Batch-norm and instance-norm branches, mixed by a learned spatial selector."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False)
        self.selector = Selector(channels, reduction=reduction)
        self.IN = nn.InstanceNorm2d(channels)
        self.BN = nn.BatchNorm2d(channels)
        self.relu = nn.LeakyReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out1 = self.conv1(self.relu(self.BN(x)))
        out2 = self.conv2(self.relu(self.IN(x)))
        att1, att2 = self.selector(out1 + out2)
        return out1 * att1 + out2 * att2


class SelectiveDown(nn.Module):
    """Container kept for the checkpoint key layout (``SEMBlock.maxpool_conv.0``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(SelectiveConv(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class DegradationNormalization(nn.Module):
    """Concatenate features with their normalised re-encoding, re-weight channels (DNC)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channel_attention = ChannelAttention(2 * channels)
        self.SEMBlock = SelectiveDown(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.channel_attention(torch.cat([x, self.SEMBlock(x)], dim=1))


class FourierModulation(nn.Module):
    """RobustSAM's Fourier modulation block: output equals input in the published model.

    Its 1x1 convolution is kept so that checkpoints load; no work is done.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_layer = nn.Conv2d(2 * channels, 2 * channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class AntiDegradationBlock(nn.Module):
    """DNC -> Fourier modulation -> 3x3 conv, then a resampling head (AMFG)."""

    def __init__(
        self,
        channels: int,
        head: nn.Sequential,
        head_name: str = "upsample_layer",
        in_channels: int = 0,
    ) -> None:
        super().__init__()
        # in_channels > 0: a 1x1 convolution maps them to ``channels`` first
        self.reduce = nn.Conv2d(in_channels, channels, 1) if in_channels else None
        self.dnc_block_combined = DegradationNormalization(channels)
        self.fgm_block = FourierModulation(channels)
        self.conv_layer = nn.Conv2d(2 * channels, channels, kernel_size=3, padding=1)
        self.head_name = head_name
        self.add_module(head_name, head)

    def forward(self, x: torch.Tensor, robust: bool = True) -> torch.Tensor:
        if self.reduce is not None:
            x = self.reduce(x)
        if robust:
            x = self.conv_layer(self.fgm_block(self.dnc_block_combined(x)))
        return getattr(self, self.head_name)(x)


def _upsample4(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, mid_channels, kernel_size=2, stride=2),
        LayerNorm2d(mid_channels),
        nn.GELU(),
        nn.ConvTranspose2d(mid_channels, out_channels, kernel_size=2, stride=2),
    )


def _image_block(in_channels: int, dim: int, width: int) -> AntiDegradationBlock:
    """AMFG on image features of ``in_channels`` -> ``dim / 8`` channels at 4x the size;
    at their own width (RobustSAM's: the head's middle width is ``dim``), or at ``width``
    after a 1x1 convolution (its head's middle width is then ``width`` too)."""
    if not width:
        return AntiDegradationBlock(in_channels, _upsample4(in_channels, dim, dim // 8))
    return AntiDegradationBlock(width, _upsample4(width, width, dim // 8), in_channels=in_channels)


class MaskFeatureBlock(AntiDegradationBlock):
    """AMFG on the decoder's upscaled mask features (``C/8`` channels, same size)."""

    def __init__(self, transformer_dim: int) -> None:
        c = transformer_dim // 8
        head = nn.Sequential(
            nn.Conv2d(c, 2 * c, 3, 1, 1),
            LayerNorm2d(2 * c),
            nn.GELU(),
            nn.Conv2d(2 * c, c, 3, 1, 1),
        )
        super().__init__(c, head, head_name="downsample_layer")


class TokenBlock(nn.Module):
    """RobustSAM's token block (AOTG) on one robust output token per prompt."""

    def __init__(self, num_tokens: int, transformer_dim: int) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.width = transformer_dim  # a constant, so that an ONNX export can trace it
        mlp_dim = transformer_dim // num_tokens
        self.mlp = nn.Sequential(
            nn.Linear(mlp_dim, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, mlp_dim * num_tokens)
        )

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        """token: ``B x C`` -> ``B x C``: twice normalised, first quarter through the MLP."""
        width = self.width
        token = F.layer_norm(F.layer_norm(token, (width,)), (width,))
        return self.mlp(token[:, : width // self.num_tokens])


class RobustMaskDecoder(MaskDecoder):
    """SAM's mask decoder plus RobustSAM's robust token, AMFG and AOTG modules."""

    def __init__(self, config: ModelConfig) -> None:
        dim = config.prompt_embed_dim
        super().__init__(
            transformer_dim=dim,
            transformer=TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=dim,
                mlp_dim=config.decoder_mlp_dim,
                num_heads=config.decoder_num_heads,
            ),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        )
        self.residual = config.robust_residual
        vit_dim = config.early_dim
        self.custom_robust_token = nn.Embedding(self.num_mask_tokens, dim)
        self.robust_mlp = MLP(dim, dim, dim // 8, 3)
        self.fourier_mask_features = MaskFeatureBlock(dim)
        self.fourier_first_layer_features = _image_block(vit_dim, dim, config.robust_width)
        self.fourier_last_layer_features = _image_block(dim, dim, config.robust_width)
        self.custom_token_block = TokenBlock(self.num_mask_tokens, dim)

    def robust_image_features(
        self, image_embeddings: torch.Tensor, early_features: torch.Tensor
    ) -> torch.Tensor:
        """Fused image features ``1 x C/8 x 4h x 4w`` from the embedding and early features.

        Depends only on the image: compute once per slice and reuse for every click.
        early_features: ``1 x h x w x D`` (first global block output).
        """
        early = self.fourier_first_layer_features(early_features.permute(0, 3, 1, 2))
        return early + self.fourier_last_layer_features(image_embeddings)

    def forward(  # type: ignore[override]
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        robust_features: torch.Tensor,
        first_layer: FirstLayer | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res mask logits ``B x M x 4h x 4w`` and predicted IoUs ``B x M`` (robust path);
        ``first_layer``: the transformer's cached image-side projections (no mask prompt)."""
        masks, iou_pred = self._predict_robust(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            robust_features,
            first_layer,
        )
        keep = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, keep], iou_pred[:, keep]

    def _predict_robust(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        robust_features: torch.Tensor,
        first_layer: FirstLayer | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = sparse_prompt_embeddings.size(0)
        masks, iou_pred, _ = self.predict_paired(
            torch.repeat_interleave(image_embeddings, batch, dim=0),
            torch.repeat_interleave(image_pe, batch, dim=0),
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            robust_features,
            first_layer,
        )
        return masks, iou_pred

    def predict_paired(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        robust_features: torch.Tensor,
        first_layer: FirstLayer | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Robust path with one image per prompt (training batches of different images).

        image_embeddings: ``B x C x h x w``; image_pe: ``1 or B x C x h x w``; prompts ``B``;
        robust_features: ``1 or B x C/8 x 4h x 4w``. Returns all mask logits
        ``B x 4 x 4h x 4w``, IoUs ``B x 4`` and the fused robust mask features
        ``B x C/8 x 4h x 4w`` (what the clean-degraded alignment loss compares).
        first_layer: see ``paired_decoding.first_layer_image_side`` (one image only).
        """
        weights = torch.cat([self.iou_token.weight, self.custom_robust_token.weight], dim=0)
        iou_token_out, mask_tokens_out, upscaled = paired_tokens(
            self, weights, image_embeddings, image_pe, sparse_prompt_embeddings,
            dense_prompt_embeddings, first_layer,
        )  # fmt: skip
        b = upscaled.shape[0]
        robust = self.fourier_mask_features(upscaled) + robust_features.expand(b, -1, -1, -1)
        upscaled = upscaled + robust if self.residual else robust
        hyper = []
        for i in range(self.num_mask_tokens):
            token = mask_tokens_out[:, i, :]
            out = self.robust_mlp(self.custom_token_block(token))
            hyper.append(out + self.output_hypernetworks_mlps[i](token) if self.residual else out)
        masks = masks_from(torch.stack(hyper, dim=1), upscaled)
        return masks, self.iou_prediction_head(iou_token_out), upscaled


#: The last layer of each branch the residual robust path adds (zero at initialisation).
RESIDUAL_BRANCH_ENDS = (
    "fourier_mask_features.downsample_layer.3",
    "fourier_first_layer_features.upsample_layer.3",
    "fourier_last_layer_features.upsample_layer.3",
    "robust_mlp.layers.2",
)


@torch.no_grad()
def init_residual_from_plain(robust: RobustMaskDecoder, plain: MaskDecoder) -> None:
    """Start a residual robust decoder as ``plain``: its weights copied (the robust output
    tokens from the mask tokens), the last layer of every added branch zeroed. The new
    blocks' other layers keep their random initialisation, so gradients reach them once
    the zeroed layers move."""
    if not robust.residual:
        raise ValueError("init_residual_from_plain needs a decoder with robust_residual")
    robust.load_state_dict(plain.state_dict(), strict=False)
    robust.custom_robust_token.weight.copy_(plain.mask_tokens.weight)
    for name in RESIDUAL_BRANCH_ENDS:
        layer = robust.get_submodule(name)
        layer.weight.zero_()
        layer.bias.zero_()
