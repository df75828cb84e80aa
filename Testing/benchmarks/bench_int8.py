"""Int8 for the lite encoder with NNCF: which parts break, and what it costs the masks.

The encoder's ONNX graph (constants folded) quantised by NNCF's post-training
quantisation for OpenVINO (per-channel int8 weights, activations calibrated on
unlabelled slices: 12 phantom slices and the real training slices that
``scripts/fetch_real_training_images.py`` writes, 3 of every 4 of them; the 4th is
held out), in variants: every layer, NNCF's transformer scheme (SmoothQuant, LayerNorm,
softmax and GELU inputs left in float), and that scheme with chosen parts kept in float
(``--keep``). ``--sensitivity``: one stage or layer kind quantised at a time. Prints
each variant's relative RMS error of the embedding on the held-out slices, then the
time per slice of the reference package (eager, denormals flushed), OpenVINO fp32 and
the int8 variants, interleaved, best of ``--repeats``, and with ``--evaldata`` (the
labelled real scans, an agreement check only) the Dice of each variant's masks
against eager fp32's from label boxes (+5 px) on the largest slice of each case.

    .venv/bin/python Testing/benchmarks/bench_int8.py --calibration DIR [--evaldata DIR]
        [--repeats 3] [--schemes all transformer] [--keep '/seq/|/layers\\.0/' ...]
        [--sensitivity]

Needs NNCF: ``pip install 'robustmedsam[int8-bench]'`` (not a dependency of the library).
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lite import evaldata_agreement, reference_model  # noqa: E402
from bench_static_int8 import phantom_inputs  # noqa: E402

from RobustMedSAMLib.inference.engines import (  # noqa: E402
    OpenVinoGraph,
    RuntimeEncoder,
    cached_onnx,
)
from RobustMedSAMLib.inference.loader import load_named_model  # noqa: E402
from RobustMedSAMLib.inference.preprocessing import Preprocessor  # noqa: E402

STAGES = ("/seq/|/layers\\.0/", "/layers\\.1/", "/layers\\.2/", "/layers\\.3/|/neck")
KINDS = ("attn/MatMul", "qkv", "proj", "fc1", "fc2")


def real_inputs(folder: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(calibration, held out) model inputs from the unlabelled PNG slices in ``folder``."""
    pre = Preprocessor("litemedsam", 256, (0, 0, 0), (1, 1, 1))
    paths = sorted(folder.glob("*.png"))
    inputs = [pre.image(np.asarray(Image.open(p).convert("L")))[0].numpy() for p in paths]
    return [x for i, x in enumerate(inputs) if i % 4], inputs[::4]


def folded(path: Path):
    """The ONNX graph in OpenVINO with constants folded (NNCF cannot quantise the
    attention-bias Gather on a constant table)."""
    import openvino
    from openvino import passes

    model = openvino.Core().read_model(str(path))
    manager = passes.Manager()
    manager.register_pass(passes.ConstantFolding())
    manager.run_passes(model)
    return model


def quantize(path: Path, calibration: list[np.ndarray], scheme: str, keep: str = ""):
    """NNCF int8 of the encoder: ``scheme`` "all" or "transformer"; ``keep``: a regular
    expression of node names left in float (with "^(?!...)": all but those quantised)."""
    import nncf

    nncf.set_log_level(logging.ERROR)
    ignored = nncf.IgnoredScope(patterns=[keep], validate=False) if keep else None
    return nncf.quantize(
        folded(path),
        nncf.Dataset(calibration),
        preset=nncf.QuantizationPreset.MIXED,
        model_type=nncf.ModelType.TRANSFORMER if scheme == "transformer" else None,
        subset_size=len(calibration),
        ignored_scope=ignored,
    )


def relative_error(run, reference: list[np.ndarray], inputs: list[np.ndarray]) -> np.ndarray:
    """Relative RMS error of ``run``'s embedding per held-out input."""
    errors = []
    for x, want in zip(inputs, reference, strict=True):
        got = run(x)
        errors.append(np.sqrt(((got - want) ** 2).mean() / (want**2).mean()))
    return np.array(errors)


def variants(args) -> dict[str, tuple[str, str]]:
    """Variant name -> (scheme, keep pattern)."""
    out = {f"int8 {scheme}": (scheme, "") for scheme in args.schemes}
    for keep in args.keep:
        out[f"int8 transformer, float {keep}"] = ("transformer", f".*({keep}).*")
    if args.sensitivity:
        for part in STAGES + KINDS:
            out[f"int8 only {part}"] = ("transformer", f"^(?!.*({part})).*")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=Path, required=True, help="folder of PNG slices")
    parser.add_argument("--evaldata", type=Path, help="labelled real scans (agreement only)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--schemes", nargs="*", default=["all", "transformer"])
    parser.add_argument("--keep", nargs="*", default=["/seq/|/layers\\.0/|/neck"])
    parser.add_argument("--sensitivity", action="store_true")
    args = parser.parse_args()
    import openvino

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print(f"load {os.getloadavg()}", flush=True)
    model = load_named_model("litemedsam", device="cpu").model
    path = cached_onnx(model.image_encoder, 256)
    calibration, held_out = real_inputs(args.calibration)
    calibration += phantom_inputs(range(4))
    print(f"{len(calibration)} calibration slices, {len(held_out)} held out", flush=True)
    graphs = {"openvino fp32": OpenVinoGraph(path, args.threads)}
    with tempfile.TemporaryDirectory() as folder:
        for name, (scheme, keep) in variants(args).items():
            target = Path(folder) / f"{len(graphs)}.xml"
            openvino.save_model(quantize(path, calibration, scheme, keep), str(target))
            graphs[name] = OpenVinoGraph(target, args.threads)
        runs = {name: (lambda x, g=g: g({"image": x})[0]) for name, g in graphs.items()}
        reference = [runs["openvino fp32"](x) for x in held_out]
        for name, run in runs.items():
            error = relative_error(run, reference, held_out)
            print(f"{name:48s} error mean {error.mean():.3f} max {error.max():.3f}", flush=True)
        lite = reference_model().image_encoder
        runs["reference eager"] = lambda x: lite(torch.from_numpy(x))
        best = dict.fromkeys(runs, float("inf"))
        with torch.inference_mode():
            for _ in range(args.repeats + 1):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run(held_out[0])
                    best[name] = min(best[name], time.perf_counter() - start)
        for name, seconds in best.items():
            ratio = seconds / best["reference eager"]
            print(f"{name:48s} {1e3 * seconds:7.0f} ms  ratio {ratio:.2f}", flush=True)
        print(f"load {os.getloadavg()}", flush=True)
        if args.evaldata:
            models = {"eager": model}
            for name, graph in graphs.items():
                models[name] = copy.deepcopy(model)
                models[name].image_encoder = RuntimeEncoder(graph)
            for name, values in evaldata_agreement(models, args.evaldata, 1).items():
                print(f"Dice {name} vs eager fp32 on {len(values)} real slices: "
                      f"min {min(values):.4f}, mean {np.mean(values):.4f}")  # fmt: skip
    print(f"load {os.getloadavg()}")


if __name__ == "__main__":
    main()
