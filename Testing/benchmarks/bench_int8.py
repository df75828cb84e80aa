"""Int8 for the lite encoder with NNCF: which parts break, and what it costs the masks.

The encoder's ONNX graph (constants folded) quantised by NNCF's post-training
quantisation for OpenVINO (per-channel int8 weights, activations calibrated on
unlabelled slices: 12 phantom slices and the real training slices that
``scripts/fetch_real_training_images.py`` writes, 3 of every 4 of them; the 4th is
held out), in variants: every layer, NNCF's transformer scheme (SmoothQuant, LayerNorm,
softmax and GELU inputs left in float), and that scheme with chosen parts kept in float
(``--keep``). ``--sensitivity``: the first ``--keep`` pattern with one more stage or
layer kind kept in float, one at a time. Prints, per variant as it is made: the relative
RMS error of the embedding on the held-out slices; the Dice of its masks against eager
fp32's on unlabelled data (the held-out real slices, boxes from eager fp32's own masks
of four boxes placed on each slice, + 5 px; 4 held-out phantoms, truth box + 5 px of
their 3 largest objects); its time per slice and the reference package's (eager,
denormals flushed), interleaved, best of ``--repeats``. Then the variant that the
selection rule picks from those figures alone (``select``: of the int8 variants at or
under ``--limit`` x the reference's time, the highest worst-case unlabelled Dice), and
with ``--evaldata`` (the labelled real scans, an agreement check only, never for the
choice) the Dice of each variant's masks against eager fp32's from label boxes (+5 px)
on the largest slice of each case.

    .venv/bin/python Testing/benchmarks/bench_int8.py --calibration DIR [--evaldata DIR]
        [--repeats 3] [--schemes all transformer] [--keep '/seq/|/layers\\.0/' ...]
        [--sensitivity] [--limit 0.30]

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
from bench_lite import dice, evaldata_agreement, reference_model  # noqa: E402
from bench_static_int8 import phantom_inputs  # noqa: E402

from RobustMedSAMLib.inference.engines import (  # noqa: E402
    OpenVinoGraph,
    RuntimeEncoder,
    cached_onnx,
)
from RobustMedSAMLib.inference.loader import load_named_model  # noqa: E402
from RobustMedSAMLib.inference.predictor import Predictor  # noqa: E402
from RobustMedSAMLib.inference.preprocessing import (  # noqa: E402
    Preprocessor,
    auto_window,
)
from RobustMedSAMLib.inference.types import SlicePrompt  # noqa: E402

SENSITIVITY_PARTS = (
    "/layers\\.1/",
    "/layers\\.2/",
    "/layers\\.3/",
    "attn/MatMul",
    "qkv",
    "proj",
    "fc1",
    "fc2",
)


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
    """Variant name -> (scheme, keep pattern). ``--sensitivity``: the first ``--keep``
    pattern (the base) with one more stage or layer kind kept in float, one at a time."""
    out = {f"int8 {scheme}": (scheme, "") for scheme in args.schemes}
    for keep in args.keep:
        out[f"int8 transformer, float {keep}"] = ("transformer", f".*({keep}).*")
    if args.sensitivity:
        base = args.keep[0] if args.keep else ""
        for part in SENSITIVITY_PARTS:
            keep = f"{base}|{part}" if base else part
            out[f"int8 transformer, float base|{part}"] = ("transformer", f".*({keep}).*")
    return out


def refined_box(mask: np.ndarray, margin: int = 5) -> np.ndarray | None:
    """Box around ``mask`` grown by ``margin`` px (the label box + 5 px of the labelled
    check, drawn from a mask instead of a label); None for masks under 0.2 % or over
    90 % of the slice."""
    if not 0.002 * mask.size <= mask.sum() <= 0.9 * mask.size:
        return None
    rows, cols = np.nonzero(mask)
    h, w = mask.shape
    return np.array(
        [
            max(cols.min() - margin, 0),
            max(rows.min() - margin, 0),
            min(cols.max() + margin, w - 1),
            min(rows.max() + margin, h - 1),
        ],
        float,
    )


def seed_boxes(h: int, w: int) -> list[np.ndarray]:
    """Boxes placed on an unlabelled slice: centred at 50 % and 25 % of its size, and
    30 % boxes left and right of the centre."""
    out = []
    for cx, cy, size in ((0.5, 0.5, 0.5), (0.5, 0.5, 0.25), (0.3, 0.5, 0.3), (0.7, 0.5, 0.3)):
        half_w, half_h = size * w / 2, size * h / 2
        out.append(np.array([cx * w - half_w, cy * h - half_h, cx * w + half_w, cy * h + half_h]))
    return out


def phantom_slices(seeds: range, per_phantom: int = 3) -> list[tuple[np.ndarray, tuple, list]]:
    """(slice, window, boxes) from phantoms ``seeds`` (not those calibrated on): the
    ``per_phantom`` largest objects, each on its largest slice, truth box + 5 px."""
    from RobustMedSAMLib.datasets.phantoms import organ_scene, random_scene

    out = []
    for seed in seeds:
        phantom = organ_scene(seed=seed) if seed % 2 == 0 else random_scene(seed=seed)
        window = auto_window(phantom.image)
        values = [v for v in np.unique(phantom.labels) if v > 0]
        sizes = {v: int((phantom.labels == v).sum()) for v in values}
        for value in sorted(values, key=lambda v: -sizes[v])[:per_phantom]:
            mask = phantom.labels == value
            k = int(np.argmax(mask.sum(axis=(1, 2))))
            box = refined_box(mask[k])
            if box is not None:
                out.append((phantom.image[k], window, [box]))
    return out


def real_slices(folder: Path) -> list[tuple[np.ndarray, tuple, list]]:
    """(slice, window, seed boxes) of the held-out unlabelled real PNG slices."""
    paths = sorted(folder.glob("*.png"))[::4]
    slices = [np.asarray(Image.open(p).convert("L")) for p in paths]
    return [(x, (0.0, 255.0), seed_boxes(*x.shape)) for x in slices]


def unlabelled_prompts(model, slices) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(slice index, box, eager fp32 mask) on unlabelled slices: each seed box's fp32
    mask gives a box (+ 5 px), and that box's fp32 mask is the reference (no label)."""
    predictor = Predictor(model, preprocessing="litemedsam")
    prompts = []
    for index, (image, window, boxes) in enumerate(slices):
        predictor.set_image(image, window)
        for seed in boxes:
            box = refined_box(predictor.predict(SlicePrompt(box=seed)).mask)
            if box is not None:
                prompts.append((index, box, predictor.predict(SlicePrompt(box=box)).mask))
    return prompts


def unlabelled_dice(model, slices, prompts) -> np.ndarray:
    """Dice of ``model``'s masks against the eager fp32 references of ``prompts``."""
    predictor = Predictor(model, preprocessing="litemedsam")
    scores, current = [], None
    for index, box, want in prompts:
        if index != current:
            predictor.set_image(*slices[index][:2])
            current = index
        scores.append(dice(want, predictor.predict(SlicePrompt(box=box)).mask))
    return np.array(scores)


def best_times(runs: dict, x: np.ndarray, repeats: int) -> dict[str, float]:
    """Best seconds per call of each run on ``x``, the runs interleaved."""
    best = dict.fromkeys(runs, float("inf"))
    with torch.inference_mode():
        for _ in range(repeats + 1):
            for name, run in runs.items():
                start = time.perf_counter()
                run(x)
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def with_encoder(model, graph):
    """A copy of ``model`` with its image encoder on ``graph``."""
    out = copy.deepcopy(model)
    out.image_encoder = RuntimeEncoder(graph)
    return out


def select(rows: dict[str, dict], limit: float) -> str | None:
    """The selection rule (unlabelled data only): of the int8 variants at or under
    ``limit`` x the reference's time, the highest minimum unlabelled Dice (then mean)."""
    fast = {n: r for n, r in rows.items() if n.startswith("int8") and r["ratio"] <= limit}
    if not fast:
        return None
    return max(fast, key=lambda n: (fast[n]["dice"].min(), fast[n]["dice"].mean()))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=Path, required=True, help="folder of PNG slices")
    parser.add_argument("--evaldata", type=Path, help="labelled real scans (agreement only)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--schemes", nargs="*", default=["all", "transformer"])
    parser.add_argument("--keep", nargs="*", default=["/seq/|/layers\\.0/|/neck"])
    parser.add_argument("--sensitivity", action="store_true")
    parser.add_argument("--limit", type=float, default=0.30, help="ratio for the selection")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import openvino

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print(f"load {os.getloadavg()}", flush=True)
    model = load_named_model("litemedsam", device="cpu").model
    path = cached_onnx(model.image_encoder, 256)
    calibration, held_out = real_inputs(args.calibration)
    calibration += phantom_inputs(range(4))
    slices = real_slices(args.calibration) + phantom_slices(range(4, 8))
    prompts = unlabelled_prompts(model, slices)
    print(
        f"{len(calibration)} calibration slices, {len(held_out)} held out; "
        f"{len(prompts)} unlabelled prompts on {len(slices)} held-out real and phantom slices",
        flush=True,
    )
    fp32 = OpenVinoGraph(path, args.threads)
    lite = reference_model().image_encoder
    base = {
        "reference eager": lambda x: lite(torch.from_numpy(x)),
        "openvino fp32": lambda x: fp32({"image": x})[0],
    }
    reference = [base["openvino fp32"](x) for x in held_out]
    graphs, rows = {"openvino fp32": fp32}, {}
    print("variant | embedding error mean/max | unlabelled Dice min/mean | ms | ratio")
    with tempfile.TemporaryDirectory() as folder:
        for name, (scheme, keep) in {"openvino fp32": ("", ""), **variants(args)}.items():
            if name not in graphs:
                target = Path(folder) / f"{len(graphs)}.xml"
                openvino.save_model(quantize(path, calibration, scheme, keep), str(target))
                graphs[name] = OpenVinoGraph(target, args.threads)
            graph = graphs[name]
            run = lambda x, g=graph: g({"image": x})[0]  # noqa: E731
            times = best_times({**base, name: run}, held_out[0], args.repeats)
            rows[name] = {
                "error": relative_error(run, reference, held_out),
                "dice": unlabelled_dice(with_encoder(model, graph), slices, prompts),
                "ms": 1e3 * times[name],
                "ratio": times[name] / times["reference eager"],
            }
            print_row(name, rows[name], times["reference eager"])
        chosen = select(rows, args.limit)
        print(f"selected on unlabelled data (ratio <= {args.limit}): {chosen}", flush=True)
        print(f"load {os.getloadavg()}", flush=True)
        if args.evaldata:
            models = {"eager": model, **{n: with_encoder(model, g) for n, g in graphs.items()}}
            for name, values in evaldata_agreement(models, args.evaldata, 1).items():
                print(f"Dice {name} vs eager fp32 on {len(values)} real slices: "
                      f"min {min(values):.4f}, mean {np.mean(values):.4f}")  # fmt: skip
    print(f"load {os.getloadavg()}")


def print_row(name: str, row: dict, reference_seconds: float) -> None:
    error, scores = row["error"], row["dice"]
    print(
        f"{name:56s} | {error.mean():.3f} / {error.max():.3f} | "
        f"{scores.min():.4f} / {scores.mean():.4f} | {row['ms']:5.0f} | {row['ratio']:.2f} "
        f"(reference {1e3 * reference_seconds:.0f} ms, load {os.getloadavg()[0]:.1f})",
        flush=True,
    )


if __name__ == "__main__":
    main()
