"""The GPU path measured in one run: ViT-B fused and LiteMedSAM, float32 against --half.

Skips (exit 0, one line) without a CUDA GPU. Per model and precision: the image encoder
per slice against the reference package's (same weights, same GPU, interleaved, best of
``--repeats``), one click on an encoded slice, 40 slices encoded and clicked in
propagation order (what propagation costs, stop rule aside), a 40-slice lesion
propagated from one box (lite models: real weights), peak GPU memory, and the Dice of
--half masks against float32 ones. ViT-B fused has random weights in the published
layout (the real checkpoints are not offline here), so its masks say nothing about
quality, only about agreement between precisions.

    .venv/bin/python Testing/benchmarks/bench_gpu.py [--repeats 10]

``--cpu --tiny --no-lesion`` runs every code path on the CPU in seconds (ViT-B replaced by
the tiny test configuration): ``Testing/benchmarks/test_bench_gpu.py`` does that.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from bench_lite import dice, lesion_run, reference_model  # noqa: E402
from reference_models import random_state_dict, reference_robust_sam  # noqa: E402

from RobustMedSAMLib.inference.loader import load_named_model  # noqa: E402
from RobustMedSAMLib.inference.predictor import Predictor  # noqa: E402
from RobustMedSAMLib.inference.types import SlicePrompt  # noqa: E402
from RobustMedSAMLib.model.config import TINY, VIT_B  # noqa: E402
from RobustMedSAMLib.model.sam import SegmentAnythingModel  # noqa: E402


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_seconds(fn, repeats: int) -> float:
    """Best of ``repeats`` wall seconds of ``fn()``, synchronised, after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def build(name: str, device: torch.device, tiny: bool = False) -> tuple:
    """(our model, the reference's image encoder, preprocessing) for ``name``; ``tiny``:
    the fused model in the tiny test configuration instead of ViT-B (a dry run)."""
    if name == "litemedsam":
        lite = load_named_model("litemedsam", device="cpu").model
        return lite.to(device), reference_model().image_encoder.to(device), "litemedsam"
    config = TINY if tiny else VIT_B
    state = random_state_dict(config, robust=True, seed=0)
    fused = SegmentAnythingModel(config, robust=True)
    fused.load_state_dict(state)
    reference = reference_robust_sam(config, state).image_encoder
    return fused.to(device), reference.to(device), "medsam"


def slice_stack(size: int, n: int) -> np.ndarray:
    """``n`` smooth random slices ``size x size`` (a CT-like range)."""
    rng = np.random.default_rng(0)
    base = rng.normal(0, 200, (n, size // 8, size // 8))
    return np.kron(base, np.ones((8, 8)))


def run_model(name, model, reference_encoder, preprocessing, args) -> None:
    size = model.config.image_size
    x = torch.rand(1, 3, size, size, device=model.device)
    with torch.inference_mode():
        reference = cuda_seconds(lambda: reference_encoder(x), args.repeats)
    slices = slice_stack(256, args.slices)
    box = SlicePrompt(box=np.array([60.0, 60.0, 190.0, 200.0]))
    masks = {}
    for half in (False, True):
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        predictor = Predictor(model, preprocessing=preprocessing, half=half)
        encode = cuda_seconds(lambda p=predictor: p.set_image(slices[0], (-400, 400)), args.repeats)
        click = cuda_seconds(lambda p=predictor: p.predict(box), args.repeats)

        def forty(p=predictor):
            return [(p.set_image(s, (-400, 400)), p.predict(box).mask)[1] for s in slices]

        start = time.perf_counter()
        masks[half] = np.stack(forty())
        synchronize()
        sweep = time.perf_counter() - start
        line = (
            f"{name:12s} {'half' if half else 'fp32':4s} encoder {1e3 * encode:7.1f} ms "
            f"(ratio {encode / reference:.2f} to the reference fp32 {1e3 * reference:.1f} ms), "
            f"click {1e3 * click:5.1f} ms, {len(slices)} slices {sweep:5.2f} s"
        )
        if preprocessing == "litemedsam" and args.lesion:
            run = lesion_run(model, preprocessing, half)
            masks[("lesion", half)] = run["mask"]
            line += (
                f", lesion {run['slices']} slices {run['seconds']:.2f} s (Dice {run['dice']:.3f})"
            )
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0
        print(f"{line}, peak {peak:.2f} GiB", flush=True)
    agreement = dice(masks[False], masks[True])
    print(f"{name:12s} half vs fp32 masks: Dice {agreement:.4f} ({len(slices)} slices)")
    if ("lesion", True) in masks:
        lesion = dice(masks[("lesion", False)], masks[("lesion", True)])
        print(f"{name:12s} half vs fp32 lesion: Dice {lesion:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--models", nargs="+", default=["fused ViT-B", "litemedsam"])
    parser.add_argument("--cpu", action="store_true", help="smoke-test the script on the CPU")
    parser.add_argument("--tiny", action="store_true", help="the tiny configuration for ViT-B")
    parser.add_argument("--no-lesion", dest="lesion", action="store_false")
    args = parser.parse_args(argv)
    if args.cpu:
        device = torch.device("cpu")
        print("CPU smoke test: the figures are not the GPU's")
    elif not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU visible to PyTorch; skipped")
        return 0
    else:
        device = torch.device("cuda")
        gpu, cuda = torch.cuda.get_device_name(device), torch.version.cuda
        print(f"{gpu}, torch {torch.__version__}, CUDA {cuda}")
    for name in args.models:
        run_model(name, *build(name, device, args.tiny), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
