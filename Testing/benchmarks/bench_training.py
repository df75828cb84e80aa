"""Decoder-only training speed: cached encoder outputs against running the frozen encoder.

Both paths run the same training step (iterative prompting, Dice + BCE + IoU losses,
backward, AdamW on the decoder) on random weights of the given size; the cached path
reads ``embedding`` + ``early`` (fp16 -> fp32) as the embedding cache serves them, the
other runs the frozen image encoder (no grad) on a ``B x 3 x S x S`` batch every step.
The alignment term is off (it would run the encoder a second time on the clean image).
Three decoders: robust with every block trained (the paper; the cache stores
``embedding`` + ``early``), robust with the image-feature blocks frozen (their output
is cached), and SAM's plain decoder (MedSAM ablation).

    .venv/bin/python Testing/benchmarks/bench_training.py [--size vit_b] [--steps 2]
        [--batch 1] [--device cpu] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from RobustMedSAMLib.model.sam import SegmentAnythingModel
from RobustMedSAMLib.training.config import TrainingConfig
from RobustMedSAMLib.training.model_setup import SIZES, select_trained, set_train_mode
from RobustMedSAMLib.training.step import TrainStep


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def steps_per_second(step, source_fn, steps: int, device: torch.device) -> float:
    step(source_fn())  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(source_fn())
    _sync(device)
    return steps / (time.perf_counter() - start)


def bench(
    size: str, robust: bool, blocks: bool, steps: int, batch: int, device: torch.device
) -> dict:
    config = TrainingConfig.from_dict(
        {
            "model": {"init": "random", "size": size, "robust": robust},
            "train": {"robust_image_blocks": blocks},
            "loss": {"align": 0.0},
            "prompts": {"corrections": 2, "box_probability": 1.0},
        }
    )
    torch.manual_seed(0)
    model = SegmentAnythingModel(SIZES[size], robust=robust).to(device)
    trained = select_trained(model, config)
    set_train_mode(model, trained, True)
    module = TrainStep(model, config, encoder_trains=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    mc = model.config
    grid, low = mc.embedding_size, mc.low_res_size
    masks = torch.zeros(batch, low, low, dtype=torch.bool, device=device)
    masks[:, low // 4 : low // 2, low // 3 : low // 2] = True
    corrupted = torch.zeros(batch, dtype=torch.bool, device=device)

    def step(source: dict) -> None:
        optimizer.zero_grad(set_to_none=True)
        total, _ = module(source, None, masks, corrupted, np.random.default_rng(0))
        total.backward()
        optimizer.step()

    def cached() -> dict:  # what EmbeddingCache.get returns (stored fp16)
        stored = {"embedding": torch.randn(batch, mc.prompt_embed_dim, grid, grid)}
        if robust and blocks:
            stored["early"] = torch.randn(batch, grid, grid, mc.encoder_embed_dim)
        elif robust:
            stored["robust"] = torch.randn(batch, mc.prompt_embed_dim // 8, low, low)
        return {k: v.half().to(device).float() for k, v in stored.items()}

    def encoded() -> dict:
        return {"images": torch.randn(batch, 3, mc.image_size, mc.image_size, device=device)}

    with_cache = steps_per_second(step, cached, steps, device)
    with_encoder = steps_per_second(step, encoded, steps, device)
    return {"cached": with_cache, "encoder": with_encoder, "ratio": with_cache / with_encoder}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="vit_b", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"size {args.size}, batch {args.batch}, {args.steps} timed steps, device {device}")
    cases = (
        (True, True, "robust decoder, all trained"),
        (True, False, "robust, image blocks frozen"),
        (False, False, "plain SAM decoder"),
    )
    for robust, blocks, label in cases:
        r = bench(args.size, robust, blocks, args.steps, args.batch, device)
        print(
            f"{label:29s} cached {r['cached']:8.3f} steps/s  encoder every step "
            f"{r['encoder']:8.3f} steps/s  ratio {r['ratio']:6.1f}x"
        )


if __name__ == "__main__":
    main()
