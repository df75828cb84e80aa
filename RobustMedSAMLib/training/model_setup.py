"""Building the model a training config asks for and choosing what it trains."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from RobustMedSAMLib.model.config import TINY, VIT_B
from RobustMedSAMLib.model.sam import SegmentAnythingModel
from RobustMedSAMLib.training.config import ModelSection, TrainingConfig
from RobustMedSAMLib.training.svd import DELTA_SUFFIX, apply_svd

log = logging.getLogger(__name__)

SIZES = {"tiny": TINY, "vit_b": VIT_B}
IMAGE_BLOCKS = (
    "mask_decoder.fourier_first_layer_features.",
    "mask_decoder.fourier_last_layer_features.",
)


def build_model(section: ModelSection, seed: int = 0) -> SegmentAnythingModel:
    """From a checkpoint (file or registry name; LiteMedSAM's with ``robust`` gives
    RobustMedSAM-Lite before training), a fused encoder + decoder pair, or random
    weights (``torch.manual_seed(seed)``: the same seed gives the same model)."""
    from RobustMedSAMLib.weights import checkpoint as ckpt

    if section.init == "random":
        torch.manual_seed(seed)
        return SegmentAnythingModel(SIZES[section.size], robust=section.robust)
    if section.encoder and section.decoder:
        fused = ckpt.fuse_state_dicts(
            ckpt.read_state_dict(section.encoder),
            ckpt.read_state_dict(section.decoder),
            section.encoder,
            section.decoder,
        )
        model = SegmentAnythingModel(ckpt.infer_config(fused), robust=True)
        model.load_state_dict(fused, strict=False)  # checked part by part when fusing
        return model
    from RobustMedSAMLib.weights.registry import resolve_checkpoint

    path = (
        resolve_checkpoint(section.checkpoint)
        if not Path(section.checkpoint).is_file()
        else Path(section.checkpoint)
    )
    state = ckpt.read_state_dict(path)
    if section.robust and ckpt.TINY_VIT_MARKER in state and not ckpt.is_robust(state):
        # LiteMedSAM -> RobustMedSAM-Lite, its robust decoder started as LiteMedSAM's
        return ckpt.robust_lite_from_litemedsam(state, path)
    return ckpt.load_model(path, robust=section.robust)


def select_trained(model: SegmentAnythingModel, config: TrainingConfig) -> set[str]:
    """Freeze what the mode keeps fixed (SVD wrapping for ``svd``); returns the names of
    the trained parameters. decoder: mask decoder (with its robust modules); svd: the
    encoder's singular-value changes (+ decoder); full: everything."""
    mode = config.train.mode
    if mode == "svd":
        replaced = apply_svd(model.image_encoder, config.svd.targets, config.svd.rank)
        log.info("SVD fine-tuning of %d encoder linear layers", len(replaced))
    for name, parameter in model.named_parameters():
        if mode == "full":
            train = True
        elif mode == "svd":
            train = name.endswith(DELTA_SUFFIX) or (
                config.svd.train_decoder and name.startswith("mask_decoder.")
            )
        else:
            train = name.startswith("mask_decoder.")
        if mode != "full" and not config.train.robust_image_blocks:
            train = train and not name.startswith(IMAGE_BLOCKS)
        parameter.requires_grad_(train)
    return {name for name, p in model.named_parameters() if p.requires_grad}


def set_train_mode(model: SegmentAnythingModel, trained: set[str], training: bool) -> None:
    """Trained parts in train mode (BatchNorm batch statistics), frozen parts in eval."""
    model.eval()
    if not training:
        return
    if any(
        name.startswith("image_encoder.") and not name.endswith(DELTA_SUFFIX) for name in trained
    ):
        model.train()
    elif any(name.startswith("mask_decoder.") for name in trained):
        model.mask_decoder.train()
        for child_name, child in model.mask_decoder.named_children():
            prefix = f"mask_decoder.{child_name}."
            if not any(name.startswith(prefix) for name in trained):
                child.eval()  # frozen blocks keep their BatchNorm statistics
