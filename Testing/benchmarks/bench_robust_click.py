"""One click on the CPU: litemedsam's and robustmedsam-lite's decoders, per engine.

Prints, per model (``litemedsam``, ``robustmedsam-lite``) and engine (eager, ONNX
Runtime, OpenVINO; a missing runtime is skipped), the median milliseconds of one click
on an encoded 256 x 256 slice (``Predictor.predict``: prompt encoder, mask decoder,
logits to the slice, the mask) for a box prompt, one positive point (three candidates)
and a box with a fed-back mask (what propagation sends; it changes the decoder's first
layer, so robustmedsam-lite cannot use the slice's cached projections), the runs
interleaved across all variants ``--repeats`` times; and each variant's ratio to the
same model's eager click and to litemedsam's click on the same engine; each click's
GFLOP (torch's FLOP counter on the eager model) and the fraction of the CPU's 2048^2
float32 sgemm peak, measured before and after the clicks, it reaches. All engines of a
model decode the same eager features, so only the decoder differs. With ``--profile``,
where robustmedsam-lite's eager decoder spends a box click (median milliseconds per
block, from forward hooks).

    PYTHONPATH=. .venv/bin/python Testing/benchmarks/bench_robust_click.py \
        [--repeats 30] [--threads 2] [--engines eager onnx openvino] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections import defaultdict

import numpy as np
import torch

from RobustMedSAMLib.inference.engines import use_engine
from RobustMedSAMLib.inference.loader import load_named_model
from RobustMedSAMLib.inference.predictor import Predictor
from RobustMedSAMLib.inference.types import SlicePrompt

MODELS = ("litemedsam", "robustmedsam-lite")
_DISC = np.hypot(*np.mgrid[-120:136, -125:131]) < 40  # the slice's disc, low-res grid
PROMPTS = {
    "box": SlicePrompt(box=np.array([60.0, 70.0, 190.0, 170.0])),
    "point x3": SlicePrompt(points=[[125.0, 120.0]], labels=[1]),  # three candidates
    # what propagation and a correction click send: the previous mask's logits fed back
    "box+mask": SlicePrompt(
        box=np.array([80.0, 75.0, 170.0, 165.0]),
        mask_input=np.where(_DISC, 8.0, -8.0)[None].astype(np.float32),
    ),
}
BLOCKS = (  # layer 0 of the transformer runs piecewise (cached projections): in "rest"
    "transformer.layers.1",
    "transformer.final_attn_token_to_image",
    "output_upscaling",
    "fourier_mask_features.dnc_block_combined",
    "fourier_mask_features.conv_layer",
    "fourier_mask_features.downsample_layer",
    "custom_token_block",
    "robust_mlp",
    "output_hypernetworks_mlps",
    "iou_prediction_head",
)


def slice_image() -> np.ndarray:
    """A 256 x 256 slice: a bright disc on a noisy ramp."""
    rows, cols = np.mgrid[:256, :256]
    noise = np.random.default_rng(0).normal(scale=10.0, size=rows.shape)
    return 100.0 + 0.3 * cols + 400.0 * (np.hypot(rows - 120, cols - 125) < 40) + noise


def predictors(engines: list[str]) -> dict[tuple[str, str], Predictor]:
    """(model, engine) -> a predictor holding the model's eager features of one slice."""
    found = {}
    for name in MODELS:
        base = load_named_model(name, device="cpu").model
        eager = Predictor(base, preprocessing="litemedsam")
        eager.set_image(slice_image(), window=(0.0, 600.0))
        for engine in engines:
            model = copy.deepcopy(base)
            if use_engine(model, engine) != engine:
                continue
            predictor = Predictor(model, preprocessing="litemedsam")
            predictor.current = eager.current
            found[name, engine] = predictor
    return found


def click_ms(found: dict[tuple[str, str], Predictor], repeats: int) -> dict[tuple, float]:
    """(model, engine, prompt) -> median ms of one click, the variants interleaved."""
    times = defaultdict(list)
    for _ in range(2):  # warm-up: first-call allocations, runtime caches
        for predictor in found.values():
            for prompt in PROMPTS.values():
                predictor.predict(prompt)
    for _ in range(repeats):
        for (model, engine), predictor in found.items():
            for label, prompt in PROMPTS.items():
                start = time.perf_counter()
                predictor.predict(prompt)
                times[model, engine, label].append(1e3 * (time.perf_counter() - start))
    return {key: statistics.median(values) for key, values in times.items()}


def sgemm_peak(size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a ``size``^2 float32 matmul, best of ``repeats``."""
    a, b, best = torch.rand(size, size), torch.rand(size, size), float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def click_gflop(found: dict[tuple[str, str], Predictor]) -> dict[tuple[str, str], float]:
    """(model, prompt) -> GFLOP of one click on the eager model (torch's counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    gflop = {}
    for (model, engine), predictor in found.items():
        for label, prompt in PROMPTS.items() if engine == "eager" else ():
            counter = FlopCounterMode(display=False)
            with counter:
                predictor.predict(prompt)
            gflop[model, label] = counter.get_total_flops() / 1e9
    return gflop


def report(medians: dict[tuple, float], gflop: dict[tuple[str, str], float], peak: float):
    print(f"{'model':18} {'engine':9} {'prompt':9} {'ms':>7} {'/eager':>7} {'/lite':>7}", end="")
    print(f" {'GFLOP':>6} {'of peak':>8}")
    for (model, engine, prompt), ms in medians.items():
        eager = medians.get((model, "eager", prompt))
        lite = medians.get(("litemedsam", engine, prompt))
        ratios = [f"{ms / ref:7.2f}" if ref else f"{'-':>7}" for ref in (eager, lite)]
        work = gflop.get((model, prompt), float("nan"))
        share = work / (ms / 1e3) / peak
        print(f"{model:18} {engine:9} {prompt:9} {ms:7.1f} {ratios[0]} {ratios[1]}", end="")
        print(f" {work:6.2f} {share:8.0%}")


def profile_blocks(predictor: Predictor, repeats: int) -> None:
    """Median ms per decoder block of an eager robust box click (forward hooks)."""
    decoder = predictor.model.mask_decoder
    times, starts = defaultdict(list), {}

    def before(name):
        return lambda module, args: starts.__setitem__(name, time.perf_counter())

    def after(name):
        return lambda module, args, out: times[name].append(time.perf_counter() - starts[name])

    handles = []
    for name in ("", *BLOCKS):
        module, label = decoder.get_submodule(name), name or "decoder (total)"
        for part in module if isinstance(module, torch.nn.ModuleList) else [module]:
            handles += [part.register_forward_pre_hook(before(label))]
            handles += [part.register_forward_hook(after(label))]
    for _ in range(repeats):
        predictor.predict(PROMPTS["box"])
    for handle in handles:
        handle.remove()
    print("robustmedsam-lite eager box click, median ms per block (all calls in a click):")
    per_click = {
        name: 1e3 * np.array(values).reshape(repeats, -1).sum(axis=1)
        for name, values in times.items()
    }
    total = per_click.pop("decoder (total)")
    for name, values in per_click.items():
        print(f"  {name:45} {float(np.median(values)):7.2f}")
    rest = total - sum(per_click.values())
    print(f"  {'rest (transformer layer 0, upscaled sums, masks)':45} {np.median(rest):7.2f}")
    print(f"  {'decoder (total)':45} {np.median(total):7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", nargs="+", default=["eager", "onnx", "openvino"])
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    found = predictors(args.engines)
    gflop = click_gflop(found)
    print(f"load average before: {os.getloadavg()[0]:.2f}; threads {args.threads}")
    peaks = [sgemm_peak()]
    medians = click_ms(found, args.repeats)
    peaks.append(sgemm_peak())
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"sgemm peak before/after the clicks: {peaks[0]:.0f}/{peaks[1]:.0f} GFLOP/s (mean used)")
    report(medians, gflop, sum(peaks) / 2)
    if args.profile and ("robustmedsam-lite", "eager") in found:
        profile_blocks(found["robustmedsam-lite", "eager"], args.repeats)


if __name__ == "__main__":
    main()
