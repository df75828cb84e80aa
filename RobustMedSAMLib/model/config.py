"""Model configurations: one dataclass builds ViT-B, LiteMedSAM and a small test size."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Literal


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a SAM-family model (image encoder, prompt encoder, mask decoder).

    The robust decoder modules of RobustSAM scale with ``encoder_embed_dim`` (the
    early encoder features they consume) and ``prompt_embed_dim`` (the decoder width).
    ``encoder_kind`` "vit" is SAM's ViT (the ``encoder_*`` fields shape it); "tiny_vit" is
    LiteMedSAM's TinyViT (fixed shape; ``patch_size`` 4 gives its S/4 embedding grid).
    ``robust_residual``: the robust path adds its blocks' outputs to the plain decoder's
    features and hypernetwork outputs instead of replacing them (RobustMedSAM-Lite, whose
    new blocks start at zero so that it starts as the plain decoder; RobustSAM: off).
    ``robust_width``: 0 runs the anti-degradation blocks on the image features at their
    own width (RobustSAM: 768 and 256 channels); n > 0 first maps both to n channels
    with a 1 x 1 convolution (RobustMedSAM-Lite: 64, a tenth of the work per image).
    """

    image_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    pixel_mean: tuple[float, float, float] = field(default=(123.675, 116.28, 103.53))
    pixel_std: tuple[float, float, float] = field(default=(58.395, 57.12, 57.375))
    encoder_kind: Literal["vit", "tiny_vit"] = "vit"
    robust_residual: bool = False
    robust_width: int = 0

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for ViT-B at 1024)."""
        return self.image_size // self.patch_size

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's low-resolution mask logits (256 for ViT-B)."""
        return 4 * self.embedding_size

    @property
    def early_dim(self) -> int:
        """Channels of the early encoder features the robust decoder consumes (ViT: its
        width at the first global block; TinyViT: its second stage's output, 160)."""
        return self.encoder_embed_dim

    @property
    def first_global_block(self) -> int:
        """Index of the encoder block whose output the robust decoder consumes."""
        return min(self.encoder_global_attn_indexes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        values = dict(values)
        for key in ("encoder_global_attn_indexes", "pixel_mean", "pixel_std"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


VIT_B = ModelConfig()
VIT_L = ModelConfig(
    encoder_embed_dim=1024,
    encoder_depth=24,
    encoder_num_heads=16,
    encoder_global_attn_indexes=(5, 11, 17, 23),
)
VIT_H = ModelConfig(
    encoder_embed_dim=1280,
    encoder_depth=32,
    encoder_num_heads=16,
    encoder_global_attn_indexes=(7, 15, 23, 31),
)
# A few-second-per-volume size for tests and training examples.
TINY = ModelConfig(
    image_size=256,
    patch_size=16,
    encoder_embed_dim=64,
    encoder_depth=4,
    encoder_num_heads=4,
    encoder_global_attn_indexes=(1, 3),
    window_size=8,
    prompt_embed_dim=64,
    decoder_mlp_dim=256,
    decoder_num_heads=8,
    iou_head_hidden_dim=64,
)

# LiteMedSAM: TinyViT encoder at 256 x 256 (64 x 64 embedding), SAM's ViT-B-sized decoder.
# encoder_embed_dim: the width of its early features (see TinyViTEncoder.forward_with_early).
LITE_MEDSAM = ModelConfig(
    image_size=256, patch_size=4, encoder_embed_dim=160, encoder_kind="tiny_vit"
)

# RobustMedSAM-Lite: LiteMedSAM + a robust decoder fed by TinyViT's second stage (160
# channels at S/4) and the final embedding, as residual branches of the plain decoder.
LITE_ROBUST = dataclasses.replace(LITE_MEDSAM, robust_residual=True, robust_width=64)

# Published SAM-family sizes, recognised from a checkpoint's encoder width.
KNOWN_ENCODERS = {768: VIT_B, 1024: VIT_L, 1280: VIT_H}
