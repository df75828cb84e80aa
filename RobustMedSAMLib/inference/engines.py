"""CPU engines for the lite image encoder: eager PyTorch, ONNX Runtime or OpenVINO.

    model = load_named_model("litemedsam", device="cpu").model
    used = use_engine(model, "openvino")   # "openvino", or "eager" when it is not installed

The encoder (TinyViT, ``1 x 3 x 256 x 256`` in, ``1 x 256 x 64 x 64`` out) is exported
once to ONNX (the graph every runtime reads) and kept in the user cache folder under the
SHA-256 of its weights, so later loads skip the export (about 10 s). ONNX Runtime and
OpenVINO run that graph in float32; the prompt encoder and mask decoder stay in
PyTorch (a click is cheap). Both runtimes are optional (``pip install
'robustmedsam[cpu-engines]'``); a missing one logs one line and the eager encoder runs.
Measured speeds: ``Testing/benchmarks/bench_lite.py``, docs/benchmarks.md.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.formats.atomic import atomic_output
from RobustMedSAMLib.model.sam import SegmentAnythingModel
from RobustMedSAMLib.names import ENGINES
from RobustMedSAMLib.weights.registry import cache_dir

log = logging.getLogger(__name__)

EXTRA = "pip install 'robustmedsam[cpu-engines]'"
PACKAGES = {"onnx": ("onnxruntime", "onnx"), "openvino": ("openvino", "onnx")}
"""Engine -> the modules it imports (the export needs ``onnx`` too)."""


def use_engine(model: SegmentAnythingModel, engine: str, threads: int | None = None) -> str:
    """Run ``model``'s image encoder on ``engine`` (see ``ENGINES``), in place.

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
            f"--engine {engine} runs the lite models' encoder on the CPU; "
            "use --engine eager with this model or device"
        )
    if model.robust:  # the robust decoder also reads an early stage the graph omits
        log.warning("engine %r serves litemedsam's encoder only; running the eager encoder of "
                    "%s", engine, "robustmedsam-lite")  # fmt: skip
        return "eager"
    missing = [name for name in PACKAGES[engine] if not _importable(name)]
    if missing:
        log.warning(
            "engine %r needs %s (%s); running the eager PyTorch encoder",
            engine,
            " and ".join(missing),
            EXTRA,
        )
        return "eager"
    path = cached_onnx(model.image_encoder, model.config.image_size)
    threads = threads or torch.get_num_threads()
    runner = OnnxRuntimeEncoder if engine == "onnx" else OpenVinoEncoder
    model.image_encoder = runner(path, threads)
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


def cached_onnx(encoder: nn.Module, image_size: int, folder: Path | None = None) -> Path:
    """The encoder exported to ONNX (input ``image``: ``1 x 3 x S x S``), from the cache
    folder when its weights were exported before; written atomically otherwise."""
    folder = folder or cache_dir() / "engines"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"encoder-{image_size}-{weights_digest(encoder)[:16]}.onnx"
    if not path.is_file():
        log.info("exporting the image encoder to %s (once)", path)
        example = torch.zeros(1, 3, image_size, image_size)
        with atomic_output(path) as temporary, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                encoder.eval(),
                (example,),
                str(temporary),
                dynamo=False,
                input_names=["image"],
                output_names=["embedding"],
                opset_version=17,
            )
    return path


class OnnxRuntimeEncoder(nn.Module):
    """An exported encoder under ONNX Runtime: ``1 x 3 x S x S`` float32 in, embedding out."""

    def __init__(self, path: Path, threads: int) -> None:
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().cpu().float().numpy()
        return torch.from_numpy(self.session.run(None, {"image": array})[0])


class OpenVinoEncoder(nn.Module):
    """An exported encoder under OpenVINO's CPU plugin, float32 and latency-tuned."""

    def __init__(self, path: Path, threads: int) -> None:
        super().__init__()
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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(images.detach().cpu().float().numpy())
        return torch.from_numpy(np.array(self.compiled(array)[0]))
