"""A disk cache of image-encoder outputs shared by every model with the same encoder.

The evaluation compares models that often share a frozen image encoder
(``litemedsam`` and ``robustmedsam-lite``: the same TinyViT, only the decoders differ),
and re-runs the same slices (clean and deterministic corruptions under several prompt
seeds, a model added to a finished run). The encoder is nearly all of the cost, so its
outputs are stored once per (encoder weights, model input) and read back by any model
with those weights:

    attach_encoder_cache(model, Path("runs/encoder-cache"))   # model.image_encoder wrapped
    model.encode(images)                                      # computed once, then read

The key is the SHA-256 of the encoder's weights and of the exact ``1 x 3 x S x S`` input
tensor (after the model's own preprocessing), so a different corruption, seed, slice,
window or preprocessing is a different entry, and a hit returns exactly what the encoder
gave. Each entry is one safetensors file holding ``embedding`` ``B x C x h x w`` and, when
the encoder has them, the ``early`` features ``B x h x w x D`` that a robust decoder
consumes (channels last, as ``forward_with_early`` returns them). A file appears only
when complete (written beside, then renamed); a damaged one is recomputed.

``engine`` "onnx" or "openvino" computes a lite (TinyViT) encoder's misses under that
runtime on the CPU, both outputs from one exported graph (``inference.engines``; float32,
within about 1e-5 of eager); the engine is part of the key. ViT encoders stay eager.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.formats.atomic import atomic_output, make_folder
from RobustMedSAMLib.inference.engines import (
    EXTRA,
    PACKAGES,
    OnnxRuntimeGraph,
    OpenVinoGraph,
    cached_onnx,
    weights_digest,
)
from RobustMedSAMLib.names import ENGINES

log = logging.getLogger(__name__)

CHANNELS_FIRST = "early_channels_first"  # a marker entry: early stored as B x D x h x w


class CachedEncoder(nn.Module):
    """Wraps an image encoder; ``forward`` and ``forward_with_early`` read the cache
    first. ``hits`` / ``misses`` count the calls served from disk and computed."""

    def __init__(
        self, encoder: nn.Module, folder: Path, runtime: nn.Module | None = None, engine: str = ""
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.runtime = runtime  # (embedding, early) from an exported graph, or None: eager
        self.folder = make_folder(folder)
        self.digest = weights_digest(encoder) + engine
        self.with_early = hasattr(encoder, "forward_with_early")
        self.hits = self.misses = 0

    def key(self, images: torch.Tensor) -> str:
        """SHA-256 of the weights' digest and the input's dtype, shape and values."""
        array = images.detach().cpu().contiguous().numpy()
        digest = hashlib.sha256(self.digest.encode())
        digest.update(f"{array.dtype}{array.shape}".encode())
        if torch.is_autocast_enabled(images.device.type):
            digest.update(str(torch.get_autocast_dtype(images.device.type)).encode())
        digest.update(array.tobytes())
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def _read(self, path: Path) -> dict[str, torch.Tensor] | None:
        if not path.is_file():
            return None
        try:
            stored = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            log.warning("encoder cache entry %s unreadable (%s): recomputing", path, error)
            return None
        if "embedding" not in stored or (self.with_early and "early" not in stored):
            return None
        return stored

    def forward_with_early(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(embedding, early)`` for ``images``, from the cache or the wrapped encoder
        (``early`` None when the wrapped encoder does not give early features)."""
        path = self._path(self.key(images))
        stored = self._read(path)
        if stored is None:
            self.misses += 1
            if self.runtime is not None:
                embedding, early = (t.to(images.device) for t in self.runtime(images))
            elif self.with_early:
                embedding, early = self.encoder.forward_with_early(images)
            else:
                embedding, early = self.encoder(images), None
            self._write(path, embedding, early)
            return embedding, early
        self.hits += 1
        early = stored.get("early")
        if early is not None and stored.get(CHANNELS_FIRST) is not None:
            early = early.permute(0, 2, 3, 1)  # the encoder's own memory layout
        return stored["embedding"].to(images.device), (
            None if early is None else early.to(images.device)
        )

    def _write(self, path: Path, embedding: torch.Tensor, early: torch.Tensor | None) -> None:
        """Store float32 on the CPU; early features that are a channels-last view of a
        channels-first tensor (TinyViT's) are stored channels first and viewed back on
        reading, so that the decoder sees the same memory layout (and sums in the same
        order) as from the encoder itself."""
        tensors = {"embedding": embedding.detach().float().cpu().contiguous()}
        if early is not None:
            early = early.detach().float().cpu()
            first = early.permute(0, 3, 1, 2)
            if first.is_contiguous() and not early.is_contiguous():
                tensors["early"], tensors[CHANNELS_FIRST] = first, torch.ones(1)
            else:
                tensors["early"] = early.contiguous()
        make_folder(path.parent)
        with atomic_output(path) as temporary:
            save_file(tensors, str(temporary))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_early(images)[0]


class _WithEarly(nn.Module):
    """The encoder's ``forward_with_early`` as a module's forward (for the export)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder.forward_with_early(images)


class _TwoOutputs(nn.Module):
    """An exported ``_WithEarly`` graph under a runtime: ``(embedding, early)``."""

    def __init__(self, graph: OnnxRuntimeGraph | OpenVinoGraph) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        array = np.ascontiguousarray(images.detach().cpu().float().numpy())
        embedding, early = self.graph({"image": array})[:2]
        return torch.from_numpy(np.array(embedding)), torch.from_numpy(np.array(early))


def _runtime(model: nn.Module, engine: str) -> tuple[nn.Module | None, str]:
    """The runtime computing a lite encoder's misses, and the engine actually used
    (eager for a ViT encoder, a model off the CPU, or a runtime not installed)."""
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "eager" or model.config.encoder_kind == "vit" or model.device.type != "cpu":
        return None, "eager"
    missing = [name for name in PACKAGES[engine] if importlib.util.find_spec(name) is None]
    if missing:
        log.warning("engine %r needs %s (%s); eager encoder", engine, " and ".join(missing), EXTRA)
        return None, "eager"
    path = cached_onnx(_WithEarly(model.image_encoder).eval(), model.config.image_size)
    threads = torch.get_num_threads()
    graph = OnnxRuntimeGraph if engine == "onnx" else OpenVinoGraph
    return _TwoOutputs(graph(path, threads)), engine


def attach_encoder_cache(model: nn.Module, folder: Path, engine: str = "eager") -> CachedEncoder:
    """Wrap ``model.image_encoder`` (in place) so that its outputs go through ``folder``;
    misses of a lite encoder run on ``engine`` (eager, onnx, openvino)."""
    runtime, used = _runtime(model, engine)
    suffix = "" if used == "eager" else used
    cached = CachedEncoder(model.image_encoder, Path(folder), runtime, suffix)
    model.image_encoder = cached
    return cached
