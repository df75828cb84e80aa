"""Static int8 for the lite encoder: calibrated on phantom slices, checked against fp32.

ONNX Runtime's ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations,
MinMax calibration on 12 unlabelled phantom slices, no real scan), then the int8 graph
under ONNX Runtime and OpenVINO against the fp32 graph: the embedding's relative error
on a held-out phantom slice and the time per slice (interleaved, best of ``--repeats``).

    .venv/bin/python Testing/benchmarks/bench_static_int8.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from RobustMedSAMLib.datasets.phantoms import organ_scene, random_scene
from RobustMedSAMLib.inference.engines import cached_onnx
from RobustMedSAMLib.inference.loader import load_named_model
from RobustMedSAMLib.inference.preprocessing import Preprocessor, auto_window, window_to_uint8


def phantom_inputs(seeds: range) -> list[np.ndarray]:
    """Model inputs ``1 x 3 x 256 x 256`` from 3 slices of each phantom (unlabelled use)."""
    pre = Preprocessor("litemedsam", 256, (0, 0, 0), (1, 1, 1))
    inputs = []
    for seed in seeds:
        phantom = organ_scene(seed=seed) if seed % 2 == 0 else random_scene(seed=seed)
        window = auto_window(phantom.image)
        depth = phantom.image.shape[0]
        for k in np.linspace(0.3 * depth, 0.7 * depth, 3).astype(int):
            inputs.append(pre.image(window_to_uint8(phantom.image[k], window))[0].numpy())
    return inputs


def quantize(source: Path, target: Path, calibration: list[np.ndarray]) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(calibration)

        def get_next(self):
            item = next(self.items, None)
            return None if item is None else {"image": item}

    quantize_static(
        str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip


def runners(fp32: Path, int8: Path, threads: int) -> dict:
    import onnxruntime
    import openvino

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    core, config = (
        openvino.Core(),
        {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"},
    )
    out = {}
    for name, path in (("fp32", fp32), ("int8", int8)):
        session = onnxruntime.InferenceSession(str(path), options)
        out[f"onnx {name}"] = lambda x, s=session: s.run(None, {"image": x})[0]
        hint = {"INFERENCE_PRECISION_HINT": "f32"} if name == "fp32" else {}
        compiled = core.compile_model(core.read_model(str(path)), "CPU", config | hint)
        out[f"openvino {name}"] = lambda x, c=compiled: np.array(c(x)[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load {os.getloadavg()}")
    model = load_named_model("litemedsam", device="cpu").model
    fp32 = cached_onnx(model.image_encoder, 256)
    calibration, held_out = phantom_inputs(range(4)), phantom_inputs(range(10, 11))[1]
    with tempfile.TemporaryDirectory() as folder:
        int8 = Path(folder) / "encoder-int8.onnx"
        start = time.perf_counter()
        quantize(fp32, int8, calibration)
        seconds = time.perf_counter() - start
        print(f"calibrated on {len(calibration)} phantom slices in {seconds:.0f} s")
        runs = runners(fp32, int8, args.threads)
        reference = runs["onnx fp32"](held_out)
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                output = run(held_out)
                best[name] = min(best[name], time.perf_counter() - start)
        for name, run in runs.items():
            output = run(held_out)
            error = np.sqrt(((output - reference) ** 2).mean() / (reference**2).mean())
            print(f"{name:14s} {1e3 * best[name]:8.0f} ms  relative RMS error {error:.2e}")
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
