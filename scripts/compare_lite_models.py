"""Quick 2D comparison of litemedsam and robustmedsam-lite (a report, not model selection).

    .venv/bin/python scripts/compare_lite_models.py [--evaldata /work/evaldata] \\
        [--decoder FILE] [--corruptions gaussian_noise motion_blur bias_field]

One slice per case: held-out phantoms (organ scenes with seeds no training run uses) and,
with ``--evaldata``, the central slice (middle of the label's slice range) of each
labelled real scan. Each slice is windowed as inference windows its volume, then shown
clean and with each corruption at severity 3 (seed 0). Prompts from the truth: the tight
box, and one click at the mask pixel nearest its centroid (decoded as inference decodes
a click: three candidates, the best-scored one). Both models share LiteMedSAM's encoder,
so each slice version is encoded once. Prints Dice means as a Markdown table and writes
every score as CSV lines to stdout after it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from RobustMedSAMLib.corruptions import corrupt
from RobustMedSAMLib.datasets.phantoms import organ_scene
from RobustMedSAMLib.evaluation.metrics import dice
from RobustMedSAMLib.formats.volume import read_volume
from RobustMedSAMLib.inference.loader import load_named_model
from RobustMedSAMLib.inference.mask_prompts import mask_box
from RobustMedSAMLib.inference.preprocessing import Preprocessor, resolve_window, window_to_uint8
from RobustMedSAMLib.model.sam import ImageFeatures

Case = tuple[str, np.ndarray, np.ndarray]  # name, uint8 slice, bool truth


def phantom_cases(count: int = 4) -> list[Case]:
    cases = []
    for number in range(count):
        texture = "ct" if number % 2 == 0 else "mr"
        phantom = organ_scene(shape=(12, 128, 128), texture=texture, seed=7700 + number)
        window, _ = resolve_window(phantom.image)
        k = phantom.image.shape[0] // 2
        labels = phantom.labels[k]
        image = window_to_uint8(phantom.image[k], window)
        for value, name in phantom.label_names.items():
            truth = labels == value
            if name != "body" and truth.sum() >= 40:
                cases.append((f"phantom{number}_{texture}_{name}", image, truth))
    return cases


def evaldata_cases(folder: Path) -> list[Case]:
    cases = []
    for label_path in sorted((folder / "labels").glob("*.nii.gz")):
        image = read_volume(folder / "images" / label_path.name).array
        label = read_volume(label_path).array > 0
        slices = np.flatnonzero(label.any(axis=(1, 2)))
        k = int(slices[len(slices) // 2])
        window, _ = resolve_window(image)
        cases.append((label_path.name[:-7], window_to_uint8(image[k], window), label[k]))
    return cases


_ENCODED: dict = {}


@torch.no_grad()
def scores(models, case: Case, corruption: str | None) -> dict[tuple[str, str], float]:
    """Dice of each model from the box and from the click on one slice version."""
    _, image, truth = case
    if corruption is not None:
        image = corrupt(image, corruption, 3, seed=0)
    pre = Preprocessor("litemedsam", 256, (0, 0, 0), (1, 1, 1))
    tensor, frame = pre.image(image)
    lite, robust = models
    key = (id(case[1]), corruption)  # organs of one phantom slice share its encoding
    if key not in _ENCODED:
        _ENCODED[key] = lite.image_encoder.forward_with_early(tensor)
    embedding, early = _ENCODED[key]
    features = {
        "litemedsam": (lite, ImageFeatures(embedding)),
        "robustmedsam-lite": (
            robust,
            ImageFeatures(embedding, robust.mask_decoder.robust_image_features(embedding, early)),
        ),
    }
    box = torch.as_tensor(pre.coords(mask_box(truth, corners="edges").reshape(2, 2), frame))
    rows, cols = np.nonzero(truth)
    nearest = int(np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2))
    point = pre.coords(np.array([[cols[nearest] + 0.5, rows[nearest] + 0.5]]), frame)
    out = {}
    for name, (model, feats) in features.items():
        logits, _ = model.decode(feats, boxes=box.reshape(1, 4).float())
        out[(name, "box")] = _dice(pre, logits[:, :1], frame, truth)
        points = (torch.as_tensor(point, dtype=torch.float32)[None], torch.ones(1, 1))
        logits, iou = model.decode(feats, points=points, multimask=True)
        best = int(iou[0].argmax())
        out[(name, "point")] = _dice(pre, logits[:, best : best + 1], frame, truth)
    return out


def _dice(pre, low_res, frame, truth) -> float:
    mask = pre.mask_logits(low_res, frame)[0, 0].numpy() > 0
    return float(dice(mask, truth))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaldata", type=Path)
    parser.add_argument("--phantoms", type=int, default=4, help="held-out phantom slices")
    parser.add_argument("--decoder", type=Path, help="a robustmedsam-lite decoder or run model")
    parser.add_argument(
        "--corruptions", nargs="*", default=["gaussian_noise", "motion_blur", "bias_field"]
    )
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    print("loading the models", file=sys.stderr, flush=True)
    lite = load_named_model("litemedsam", device="cpu").model
    robust = load_named_model("robustmedsam-lite", checkpoint=args.decoder, device="cpu").model
    groups = {"phantoms": phantom_cases(args.phantoms)}
    if args.evaldata:
        groups["evaldata"] = evaldata_cases(args.evaldata)
    rows = []
    for group, cases in groups.items():
        for case in cases:
            for corruption in [None, *args.corruptions]:
                print(f"{case[0]} {corruption or 'clean'}", file=sys.stderr, flush=True)
                for (model, prompt), value in scores((lite, robust), case, corruption).items():
                    rows.append((group, case[0], corruption or "clean", model, prompt, value))
    print("| data | condition | prompt | litemedsam | robustmedsam-lite | n |")
    print("|---|---|---|---|---|---|")
    keys = sorted({(r[0], r[2], r[4]) for r in rows}, key=lambda k: (k[0], k[1] != "clean", k))
    for group, condition, prompt in keys:
        picked = [r for r in rows if (r[0], r[2], r[4]) == (group, condition, prompt)]
        means = [np.mean([r[5] for r in picked if r[3] == m]) for m in ("litemedsam",
                 "robustmedsam-lite")]  # fmt: skip
        n = len(picked) // 2
        print(f"| {group} | {condition} | {prompt} | {means[0]:.3f} | {means[1]:.3f} | {n} |")
    print()
    for row in rows:
        print(",".join(map(str, row[:5])) + f",{row[5]:.4f}")


if __name__ == "__main__":
    main()
