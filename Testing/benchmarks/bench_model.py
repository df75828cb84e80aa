"""Image encoder and decoder time of our ViT-B against the reference packages.

Same weights (random, published key layout), same input, same thread count, measured
interleaved in one run; prints ratios (ours / reference) and the largest differences.

    .venv/bin/python Testing/benchmarks/bench_model.py [--repeats 3] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Testing: reference_models
from reference_models import random_state_dict, reference_robust_sam, reference_sam  # noqa: E402

from RobustMedSAMLib.model.config import VIT_B  # noqa: E402
from RobustMedSAMLib.model.quantization import quantize_encoder  # noqa: E402
from RobustMedSAMLib.model.sam import SegmentAnythingModel  # noqa: E402


def timed(fn, device: torch.device) -> tuple[float, object]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0, b > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def bench_encoder(args, device: torch.device) -> None:
    state = random_state_dict(VIT_B, robust=False, seed=0)
    reference = reference_sam(VIT_B, state).to(device)
    ours = SegmentAnythingModel(VIT_B, robust=False)
    ours.load_state_dict(state)
    ours.to(device)
    variants = {"reference": reference.image_encoder, "ours fp32": ours.image_encoder}
    if device.type == "cpu":
        fast = SegmentAnythingModel(VIT_B, robust=False)
        fast.load_state_dict(state)
        variants["ours int8 (--fast-cpu)"] = quantize_encoder(fast).image_encoder
    if device.type == "cuda":
        variants["ours bf16 (--half)"] = ours.image_encoder
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(1)).to(device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    outputs = {}
    with torch.inference_mode():
        for repeat in range(args.repeats + 1):  # first round warms up
            for name, encoder in variants.items():
                half = "bf16" in name
                with torch.autocast(device.type, torch.bfloat16, enabled=half):
                    seconds, out = timed(lambda enc=encoder: enc(x), device)
                outputs[name] = out.float()
                if repeat:
                    times[name].append(seconds)
    best = min(times["reference"])
    median = statistics.median(times["reference"])
    print(
        f"\nimage encoder, ViT-B 1024x1024, {device}, {torch.get_num_threads()} threads,"
        f" {args.repeats} interleaved rounds"
    )
    print(
        f"{'variant':28s} {'best s':>8s} {'ratio':>6s} {'median s':>9s} {'ratio':>6s}"
        f" {'max |diff|':>11s}"
    )
    for name, values in times.items():
        diff = (outputs[name] - outputs["reference"]).abs().max().item()
        print(
            f"{name:28s} {min(values):8.3f} {min(values) / best:6.2f}"
            f" {statistics.median(values):9.3f} {statistics.median(values) / median:6.2f}"
            f" {diff:11.2e}"
        )
    if "ours int8 (--fast-cpu)" in outputs:
        mask_agreement(state, outputs["ours fp32"], outputs["ours int8 (--fast-cpu)"], device)


def mask_agreement(state: dict, fp32: torch.Tensor, int8: torch.Tensor, device) -> None:
    """Dice between the masks decoded from fp32 and int8 embeddings, over box prompts."""
    model = SegmentAnythingModel(VIT_B, robust=False)
    model.load_state_dict(state)
    rng = np.random.default_rng(0)
    scores = []
    from RobustMedSAMLib.model.sam import ImageFeatures

    with torch.inference_mode():
        for _ in range(20):
            x0, y0 = rng.uniform(0, 700, 2)
            w, h = rng.uniform(100, 320, 2)
            box = torch.tensor([[x0, y0, x0 + w, y0 + h]], dtype=torch.float32)
            a, _ = model.decode(ImageFeatures(fp32.cpu()), boxes=box)
            b, _ = model.decode(ImageFeatures(int8.cpu()), boxes=box)
            scores.append(dice(a, b))
    print(
        f"int8 vs fp32 masks (20 boxes, random ViT-B weights): Dice mean {np.mean(scores):.3f}"
        f" min {np.min(scores):.3f}"
    )


def bench_decoder(args, device: torch.device) -> None:
    """Per-click decoder time on an encoded slice, interleaved: ours with the slice's
    image-dependent parts cached (the robust feature blocks and the transformer's layer-0
    image projections, as ``encode`` leaves them), ours with the robust blocks cached only,
    and the reference robust decoder (recomputes its feature blocks every call); the
    click's FLOPs (torch's counter) against a 2048^2 sgemm measured in the same run."""
    from torch.utils.flop_counter import FlopCounterMode

    from RobustMedSAMLib.model.paired_decoding import first_layer_image_side
    from RobustMedSAMLib.model.sam import ImageFeatures

    state = random_state_dict(VIT_B, robust=True, seed=2)
    reference = reference_robust_sam(VIT_B, state).to(device)
    ours = SegmentAnythingModel(VIT_B, robust=True)
    ours.load_state_dict(state)
    ours.to(device)
    g = torch.Generator().manual_seed(3)
    embedding = torch.randn(1, 256, 64, 64, generator=g).to(device)
    early = torch.randn(1, 64, 64, 768, generator=g).to(device)
    point = (torch.tensor([[[500.0, 400.0]]], device=device), torch.tensor([[1]], device=device))
    with torch.inference_mode():
        robust = ours.mask_decoder.robust_image_features(embedding, early)
        no_mask = ours.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        first = first_layer_image_side(
            ours.mask_decoder.transformer, embedding + no_mask, ours.dense_pe()
        )
        variants = {
            "ours, all cached": ImageFeatures(embedding, robust, first),
            "ours, robust blocks cached": ImageFeatures(embedding, robust),
        }

        def reference_click():
            sparse, dense = reference.prompt_encoder(point, None, None)
            return reference.mask_decoder(
                embedding,
                reference.prompt_encoder.get_dense_pe(),
                sparse,
                dense,
                False,
                encoder_features=early[None],
                clear=False,
            )[0]

        clicks = {"reference": reference_click}
        for name, features in variants.items():
            clicks[name] = lambda f=features: ours.decode(f, points=point)[0]
        times = {name: [] for name in clicks}
        outputs = {}
        for repeat in range(args.clicks + 2):
            for name, click in clicks.items():
                seconds, outputs[name] = timed(click, device)
                if repeat >= 2:
                    times[name].append(seconds)
        counter = FlopCounterMode(display=False)
        with counter:
            clicks["ours, all cached"]()
        gflop = counter.get_total_flops() / 1e9
    a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
    peak = 2 * 2048**3 / min(timed(lambda: a @ b, torch.device("cpu"))[0] for _ in range(5)) / 1e9
    best = {name: min(values) for name, values in times.items()}
    print(f"\nrobust decoder per click (encoded slice), {device}, best of {args.clicks};"
          f" ours {gflop:.2f} GFLOP per click, sgemm peak {peak:.0f} GFLOP/s")  # fmt: skip
    for name, seconds in best.items():
        diff = (outputs[name] - outputs["reference"]).abs().max().item()
        print(f"{name:28s} {1e3 * seconds:8.1f} ms  ratio {seconds / best['reference']:.3f}"
              f"  max |diff| {diff:.2e}")  # fmt: skip
    print(
        f"floor at the sgemm peak: {gflop / peak * 1e3:.0f} ms; "
        f"ours all cached reaches {gflop / best['ours, all cached'] / peak:.0%} of the peak"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-encoder", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {args.threads} threads, load {os.getloadavg()}")
    if not args.skip_encoder:
        bench_encoder(args, device)
    bench_decoder(args, device)
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
