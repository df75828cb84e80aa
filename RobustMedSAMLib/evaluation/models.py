"""The models compared side by side: a label and a way to load each.

A model spec on the command line is ``[LABEL=]NAME[:CHECKPOINT]`` (NAME a registry
model: litemedsam, robustmedsam-lite, sam, medsam, robustsam, medicosam, fused), or
``[LABEL=]fused:ENCODER+DECODER`` to build the fused model from a MedSAM and a
RobustSAM file. Fine-tuned, SVD and ablation runs are named checkpoints of the
architecture they were saved in, e.g. ``fused_ft=fused:runs/ft/best.pth``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.evaluation.interactive import SlicePredictor


@dataclass
class ModelEntry:
    """A model row of the comparison. ``load`` returns a predictor, or raises
    CheckpointError (reported as a "missing" row)."""

    label: str
    load: Callable[[], SlicePredictor]
    description: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec; ``checkpoint`` or ``encoder`` + ``decoder`` may be None."""

    label: str
    name: str
    checkpoint: Path | None = None
    encoder: Path | None = None
    decoder: Path | None = None


def parse_model_spec(text: str) -> ModelSpec:
    """Parse ``[LABEL=]NAME[:CHECKPOINT]`` or ``[LABEL=]fused:ENCODER+DECODER``."""
    from RobustMedSAMLib.weights.registry import model_names

    label, eq, rest = text.partition("=")
    if not eq:
        label, rest = "", text
    name, colon, where = rest.partition(":")
    if name not in model_names():
        raise InputError(
            f"bad model spec {text!r}: NAME must be one of {', '.join(model_names())} "
            "(as in [LABEL=]NAME[:CHECKPOINT])"
        )
    label = label or name
    if not colon:
        return ModelSpec(label, name)
    if not where:
        raise InputError(f"bad model spec {text!r}: nothing after ':'")
    if name == "fused" and "+" in where:
        encoder, decoder = where.split("+", 1)
        return ModelSpec(label, name, encoder=Path(encoder), decoder=Path(decoder))
    return ModelSpec(label, name, checkpoint=Path(where))


def model_entry(
    spec: ModelSpec, device: str = "auto", encoder_cache: Path | None = None, engine: str = "eager"
) -> ModelEntry:
    """A ModelEntry that loads ``spec`` with ``load_named_model`` when first used;
    with ``encoder_cache`` (a folder) its image encoder's outputs are kept there and
    shared with every model of the same encoder weights (``encoder_cache.py``).
    ``engine``: the runtime of a lite model's encoder (ViT models run eager)."""

    def load() -> SlicePredictor:
        from RobustMedSAMLib.inference.loader import load_named_model

        loaded = load_named_model(spec.name, spec.checkpoint, spec.encoder, spec.decoder, device)
        if encoder_cache is not None:
            from RobustMedSAMLib.evaluation.encoder_cache import attach_encoder_cache

            attach_encoder_cache(loaded.model, encoder_cache, engine)
        elif engine != "eager" and loaded.model.config.encoder_kind != "vit":
            from RobustMedSAMLib.inference.engines import use_engine

            use_engine(loaded.model, engine)
        return loaded.predictor()

    where = spec.checkpoint or (spec.encoder and f"{spec.encoder} + {spec.decoder}") or "registry"
    return ModelEntry(spec.label, load, f"{spec.name} ({where})")
