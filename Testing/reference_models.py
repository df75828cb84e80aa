"""Reference models from the PyPI packages ``segment-anything`` and
``robust-segment-anything``, built for any ModelConfig, and random weights with the
published key layouts. Test support only."""

from __future__ import annotations

import types
import warnings
from functools import partial

import torch

from RobustMedSAMLib.model.config import ModelConfig
from RobustMedSAMLib.model.sam import SegmentAnythingModel


def random_state_dict(config: ModelConfig, robust: bool, seed: int = 0) -> dict:
    """A state dict with the published key layout and random (non-trivial) values:
    weights ~ N(0, 0.05), BatchNorm variances in [0.5, 1.5]."""
    generator = torch.Generator().manual_seed(seed)
    state = SegmentAnythingModel(config, robust=robust).state_dict()
    for name, tensor in state.items():
        if not tensor.dtype.is_floating_point:
            continue
        if name.endswith("running_var"):
            tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
        else:
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
    return state


def _parts(modeling: types.ModuleType, config: ModelConfig) -> dict:
    grid = config.embedding_size
    return dict(
        image_encoder=modeling.ImageEncoderViT(
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
        ),
        prompt_encoder=modeling.PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(config.image_size, config.image_size),
            mask_in_chans=config.mask_in_chans,
        ),
        pixel_mean=list(config.pixel_mean),
        pixel_std=list(config.pixel_std),
    )


def _transformer(modeling: types.ModuleType, config: ModelConfig):
    return modeling.TwoWayTransformer(
        depth=config.decoder_depth,
        embedding_dim=config.prompt_embed_dim,
        mlp_dim=config.decoder_mlp_dim,
        num_heads=config.decoder_num_heads,
    )


def reference_sam(config: ModelConfig, state: dict):
    """``segment_anything``'s Sam with these weights (strict load)."""
    import segment_anything.modeling as modeling

    decoder = modeling.MaskDecoder(
        num_multimask_outputs=3,
        transformer=_transformer(modeling, config),
        transformer_dim=config.prompt_embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
    )
    sam = modeling.Sam(mask_decoder=decoder, **_parts(modeling, config))
    sam.load_state_dict(state, strict=True)
    return sam.eval()


def reference_robust_sam(config: ModelConfig, state: dict):
    """``robust_segment_anything``'s Sam with these weights (strict load); its decoder
    needs an ``opt`` object, which may be any namespace."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import robust_segment_anything.modeling as modeling

    decoder = modeling.MaskDecoder(
        opt=types.SimpleNamespace(),
        num_multimask_outputs=3,
        transformer=_transformer(modeling, config),
        transformer_dim=config.prompt_embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
        vit_dim=config.encoder_embed_dim,
    )
    sam = modeling.Sam(mask_decoder=decoder, **_parts(modeling, config))
    sam.load_state_dict(state, strict=True)
    return sam.eval()
