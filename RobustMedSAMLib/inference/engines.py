"""CPU engines for the lite models: eager PyTorch, ONNX Runtime or OpenVINO.

    model = load_named_model("litemedsam", device="cpu").model
    used = use_engine(model, "openvino")   # "openvino", or "eager" when it is not installed

The image encoder (TinyViT, ``1 x 3 x 256 x 256`` in, ``1 x 256 x 64 x 64`` out) and the
mask decoder (SAM's two-way transformer and upscaling: image embedding
``1 x 256 x 64 x 64``, dense prompt embedding of the same shape and ``1 x N x 256``
sparse prompt tokens in; ``1 x 4 x 256 x 256`` low-res logits and ``1 x 4`` predicted
IoU out) run on the engine, the dense positional encoding baked into the decoder graph as
the constant it is. For ``robustmedsam-lite`` the encoder's graph also gives the early
features its robust decoder reads (``1 x 64 x 64 x 160``), and the robust decoder runs as
two graphs that also take the slice's fused robust features (``1 x 32 x 256 x 256``):
one for prompts without a mask, which takes the slice's cached layer-0 projections
(``ImageFeatures.first_layer``), and one for a fed-back mask, which computes them; the
per-slice robust features and projections stay in PyTorch. Each graph is exported once
to ONNX (the graph every runtime reads) and kept in the user cache folder under the
SHA-256 of its weights, so later loads skip the export (about 10 s). ONNX Runtime and
OpenVINO run them in float32; the prompt encoder stays in PyTorch (under a millisecond).
Both runtimes are optional (``pip install 'robustmedsam[cpu-engines]'``); a missing one
logs one line and eager PyTorch runs. Measured speeds: ``Testing/benchmarks/bench_lite.py``,
``bench_robust_click.py``, docs/benchmarks.md.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.formats.atomic import atomic_output
from RobustMedSAMLib.model.paired_decoding import first_layer_image_side
from RobustMedSAMLib.model.sam import SegmentAnythingModel
from RobustMedSAMLib.names import ENGINES
from RobustMedSAMLib.weights.registry import cache_dir

log = logging.getLogger(__name__)

EXTRA = "pip install 'robustmedsam[cpu-engines]'"
PACKAGES = {"onnx": ("onnxruntime", "onnx"), "openvino": ("openvino", "onnx")}
"""Engine -> the modules it imports (the export needs ``onnx`` too)."""


def use_engine(model: SegmentAnythingModel, engine: str, threads: int | None = None) -> str:
    """Run ``model``'s image encoder and mask decoder on ``engine`` (see ``ENGINES``), in
    place.

    Returns the engine in use: ``engine``, or "eager" when its optional package is missing
    (one warning line says how to install it). InputError for an unknown engine, a model
    on another device than the CPU, or a ViT encoder (the runtimes serve the lite models).
    """
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "eager":
        return engine
    if model.device.type != "cpu" or model.config.encoder_kind == "vit":
        raise InputError(
            f"--engine {engine} runs the lite models on the CPU; "
            "use --engine eager with this model or device"
        )
    missing = [name for name in PACKAGES[engine] if not _importable(name)]
    if missing:
        log.warning(
            "engine %r needs %s (%s); running eager PyTorch",
            engine,
            " and ".join(missing),
            EXTRA,
        )
        return "eager"
    threads = threads or torch.get_num_threads()
    graph = OnnxRuntimeGraph if engine == "onnx" else OpenVinoGraph
    size = model.config.image_size
    encoder_path = cached_onnx(model.image_encoder, size, early=model.robust)
    model.image_encoder = RuntimeEncoder(graph(encoder_path, threads))
    if model.robust:
        paths = [cached_robust_decoder_onnx(model, cached) for cached in (True, False)]
        graphs = [graph(path, threads) for path in paths]  # without, with a mask prompt
        model.mask_decoder = RuntimeRobustDecoder(*graphs, model.mask_decoder)
    else:
        decoder_path = cached_decoder_onnx(model)
        model.mask_decoder = RuntimeDecoder(graph(decoder_path, threads), model.mask_decoder)
    return engine


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over a module's state (names, shapes, values) and torch's version."""
    digest = hashlib.sha256(torch.__version__.encode())
    for name, tensor in module.state_dict().items():
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(f"{name}{array.shape}{array.dtype}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


class EarlyGraph(nn.Module):
    """An encoder as one graph with two outputs: ``forward_with_early``'s embedding and
    early features (what a robust decoder reads besides the embedding)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder.forward_with_early(images)


def cached_onnx(
    encoder: nn.Module, image_size: int, folder: Path | None = None, early: bool = False
) -> Path:
    """The encoder exported to ONNX (input ``image``: ``1 x 3 x S x S``; output the
    embedding, and with ``early`` the early features too), from the cache folder when its
    weights were exported before; written atomically otherwise."""
    example = torch.zeros(1, 3, image_size, image_size)
    module, outputs = (
        (EarlyGraph(encoder), ["embedding", "early"]) if early else (encoder, ["embedding"])
    )
    name = f"encoder-{'early-' if early else ''}{image_size}-{weights_digest(encoder)[:16]}"
    return _cached_export(module, (example,), ["image"], outputs, {}, name, folder)


class DecoderGraph(nn.Module):
    """SAM's mask decoder as one graph: ``(embedding, dense, sparse) -> (masks, iou)``,
    the dense positional encoding ``1 x C x h x w`` a constant of the graph."""

    def __init__(self, decoder: nn.Module, image_pe: torch.Tensor) -> None:
        super().__init__()
        self.decoder = decoder
        self.register_buffer("image_pe", image_pe.detach().clone())

    def forward(
        self, embedding: torch.Tensor, dense: torch.Tensor, sparse: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder.predict_masks(embedding, self.image_pe, sparse, dense)


def cached_decoder_onnx(model: SegmentAnythingModel, folder: Path | None = None) -> Path:
    """``model``'s plain mask decoder exported to ONNX (see ``DecoderGraph``; the number
    of sparse tokens is a dynamic axis), from the cache folder when exported before."""
    image_pe, example, names = _prompt_example(model)
    graph = DecoderGraph(model.mask_decoder, image_pe).eval()
    name = f"decoder-{model.config.embedding_size}-{weights_digest(graph)[:16]}"
    return _cached_export(graph, example, names, ["masks", "iou"], DYNAMIC, name, folder)


DYNAMIC = {"sparse": {1: "tokens"}}
"""The decoder graphs' dynamic axis: the number of sparse prompt tokens."""


def _prompt_example(
    model: SegmentAnythingModel,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], list[str]]:
    """A decoder graph's constant positional encoding ``1 x C x h x w``, and example
    inputs with their names: embedding, dense prompt embedding, two sparse tokens."""
    config = model.config
    with torch.inference_mode():
        image_pe = model.prompt_encoder.get_dense_pe().cpu()
    size, channels = config.embedding_size, config.prompt_embed_dim
    features = torch.zeros(1, channels, size, size)
    example = (features, features.clone(), torch.zeros(1, 2, channels))
    return image_pe, example, ["embedding", "dense", "sparse"]


class RobustDecoderGraph(nn.Module):
    """The robust decoder (robustmedsam-lite) as one graph: ``(embedding, dense, sparse,
    robust[, keys_k, keys_v, keys_q]) -> (masks, iou)``, all four masks; ``robust`` the
    slice's fused robust features ``1 x C/8 x 4h x 4w``; the three ``1 x hw x C'`` layer-0
    projections (``ImageFeatures.first_layer``) are inputs when ``cached`` (prompts
    without a mask), else computed from ``embedding + dense`` (a mask prompt)."""

    def __init__(self, decoder: nn.Module, image_pe: torch.Tensor, cached: bool) -> None:
        super().__init__()
        self.decoder = decoder
        self.cached = cached
        self.register_buffer("image_pe", image_pe.detach().clone())

    def forward(
        self,
        embedding: torch.Tensor,
        dense: torch.Tensor,
        sparse: torch.Tensor,
        robust: torch.Tensor,
        *first_layer: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        first = tuple(first_layer) if self.cached else None
        masks, iou, _ = self.decoder.predict_paired(
            embedding, self.image_pe, sparse, dense, robust, first
        )
        return masks, iou


FIRST_LAYER = ("keys_k", "keys_v", "keys_q")
"""Input names of the layer-0 projections in a cached ``RobustDecoderGraph``."""


def cached_robust_decoder_onnx(
    model: SegmentAnythingModel, cached: bool, folder: Path | None = None
) -> Path:
    """``model``'s robust decoder exported to ONNX (see ``RobustDecoderGraph``; the number
    of sparse tokens is a dynamic axis), from the cache folder when exported before."""
    image_pe, example, names = _prompt_example(model)
    graph = RobustDecoderGraph(model.mask_decoder, image_pe, cached).eval()
    features, size = example[0], model.config.embedding_size
    robust = torch.zeros(1, features.shape[1] // 8, 4 * size, 4 * size)
    example, names = example + (robust,), names + ["robust"]
    if cached:
        with torch.no_grad():  # example values: only their shapes matter
            first = first_layer_image_side(model.mask_decoder.transformer, features, image_pe)
        example, names = example + first, names + list(FIRST_LAYER)
    kind = "cached" if cached else "full"
    name = f"robust-decoder-{kind}-{size}-{weights_digest(graph)[:16]}"
    return _cached_export(graph, example, names, ["masks", "iou"], DYNAMIC, name, folder)


def _cached_export(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    inputs: list[str],
    outputs: list[str],
    dynamic: dict[str, dict[int, str]],
    name: str,
    folder: Path | None,
) -> Path:
    """``folder / name.onnx``: ``module`` exported once (atomically), then reused."""
    folder = folder or cache_dir() / "engines"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.onnx"
    if not path.is_file():
        log.info("exporting %s to %s (once)", type(module).__name__, path)
        with atomic_output(path) as temporary, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module.eval(),
                example,
                str(temporary),
                dynamo=False,
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=dynamic or None,
                opset_version=17,
            )
    return path


class OnnxRuntimeGraph:
    """An ONNX graph under ONNX Runtime's CPU provider: named float32 arrays in, a list out."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, feeds)


class OpenVinoGraph:
    """An ONNX graph under OpenVINO's CPU plugin, float32 and latency-tuned; one request,
    so calls from several threads take turns."""

    def __init__(self, path: Path, threads: int) -> None:
        import openvino

        core = openvino.Core()
        self.compiled = core.compile_model(
            core.read_model(str(path)),
            "CPU",
            {
                "INFERENCE_NUM_THREADS": threads,
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_PRECISION_HINT": "f32",
            },
        )
        self.request = self.compiled.create_infer_request()
        self.lock = threading.Lock()

    def __call__(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self.lock:
            results = self.request.infer(feeds)
            return [np.array(results[output]) for output in self.compiled.outputs]


def _array(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().float().numpy())


class RuntimeEncoder(nn.Module):
    """An exported encoder on a runtime: ``1 x 3 x S x S`` float32 in, the embedding out
    (and from a graph exported with ``early``, the early features: ``forward_with_early``)."""

    def __init__(self, graph: OnnxRuntimeGraph | OpenVinoGraph) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with_early(images)[0]

    def forward_with_early(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(a) for a in self.graph({"image": _array(images)}))


class RuntimeDecoder(nn.Module):
    """An exported mask decoder on a runtime, called as SAM's ``MaskDecoder``; the eager
    decoder's attributes (``num_mask_tokens``, ...) stay reachable through it."""

    def __init__(self, graph: OnnxRuntimeGraph | OpenVinoGraph, eager: nn.Module) -> None:
        super().__init__()
        self.graph = graph
        self.num_mask_tokens = eager.num_mask_tokens

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``B x M x 4h x 4w`` logits and ``B x M`` IoU, M = 3 (multimask) or 1; the graph
        holds the positional encoding ``image_pe`` it was exported with."""
        feeds = _prompt_feeds(image_embeddings, dense_prompt_embeddings, sparse_prompt_embeddings)
        return _chosen_masks(self.graph(feeds), multimask_output)


def _prompt_feeds(
    embedding: torch.Tensor, dense: torch.Tensor, sparse: torch.Tensor
) -> dict[str, np.ndarray]:
    """A decoder graph's inputs for the image embedding and one prompt's embeddings."""
    return {"embedding": _array(embedding), "dense": _array(dense), "sparse": _array(sparse)}


def _chosen_masks(outputs: list[np.ndarray], multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder graph's four masks' logits and IoUs cut to the three candidates
    (``multimask``) or the single mask, as ``MaskDecoder.forward`` returns them."""
    masks, iou = (torch.from_numpy(a) for a in outputs)
    chosen = slice(1, None) if multimask else slice(0, 1)
    return masks[:, chosen], iou[:, chosen]


class RuntimeRobustDecoder(nn.Module):
    """The robust decoder on a runtime, called as ``RobustMaskDecoder``: one graph for
    prompts with the slice's cached layer-0 projections, one for a mask prompt (which
    changes them). The eager decoder stays for what ``encode`` computes once per slice
    (``transformer``, ``robust_image_features``) and is reachable as ``eager``."""

    def __init__(
        self,
        cached: OnnxRuntimeGraph | OpenVinoGraph,
        full: OnnxRuntimeGraph | OpenVinoGraph,
        eager: nn.Module,
    ) -> None:
        super().__init__()
        self.cached, self.full = cached, full
        self.eager = eager
        self.num_mask_tokens = eager.num_mask_tokens

    @property
    def transformer(self) -> nn.Module:
        return self.eager.transformer

    def robust_image_features(
        self, image_embeddings: torch.Tensor, early_features: torch.Tensor
    ) -> torch.Tensor:
        """See ``RobustMaskDecoder.robust_image_features`` (eager: once per slice)."""
        return self.eager.robust_image_features(image_embeddings, early_features)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        robust_features: torch.Tensor,
        first_layer: tuple[torch.Tensor, ...] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``1 x M x 4h x 4w`` logits and ``1 x M`` IoU, M = 3 (multimask) or 1; the graphs
        hold the positional encoding ``image_pe`` they were exported with."""
        feeds = _prompt_feeds(image_embeddings, dense_prompt_embeddings, sparse_prompt_embeddings)
        feeds["robust"] = _array(robust_features)
        graph = self.full
        if first_layer is not None:
            feeds |= {name: _array(t) for name, t in zip(FIRST_LAYER, first_layer, strict=True)}
            graph = self.cached
        return _chosen_masks(graph(feeds), multimask_output)
