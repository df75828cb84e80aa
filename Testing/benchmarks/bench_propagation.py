"""3D propagation cost with the real ViT-B model (random weights, published layout).

Prints: propagation wall time against the sum of its encoder calls (overhead ratio, target
<= 1.10), encoder calls per propagated slice (target 1.0), click latency on an encoded slice,
and peak memory (RSS) for a 512 x 512 x 300 volume. Two seed masks ``--span`` slices apart
(from the phantom's truth) are propagated towards each other, so the number of model calls
does not depend on what random weights draw.

    .venv/bin/python Testing/benchmarks/bench_propagation.py [--span 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from reference_models import random_state_dict  # noqa: E402

from RobustMedSAMLib.datasets.phantoms import ellipsoid  # noqa: E402
from RobustMedSAMLib.formats.volume import Volume  # noqa: E402
from RobustMedSAMLib.inference.predictor import Predictor  # noqa: E402
from RobustMedSAMLib.inference.propagation import PropagationOptions, propagate  # noqa: E402
from RobustMedSAMLib.inference.session import SegmentationSession  # noqa: E402
from RobustMedSAMLib.inference.slicing import ijk_box_roi  # noqa: E402
from RobustMedSAMLib.model.config import TINY, VIT_B  # noqa: E402
from RobustMedSAMLib.model.sam import SegmentAnythingModel  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--span", type=int, default=8, help="slices between the two seeds")
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="tiny model (quick check)")
    parser.add_argument(
        "--litemedsam", action="store_true", help="the default model: one box, propagated"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if args.litemedsam:
        from RobustMedSAMLib.inference.loader import load_named_model

        predictor = load_named_model("litemedsam", device="cpu").predictor()
    else:
        config = TINY if args.tiny else VIT_B
        model = SegmentAnythingModel(config, robust=True)
        model.load_state_dict(random_state_dict(config, robust=True, seed=0))
        predictor = Predictor(model, "medsam")
    label = "litemedsam" if args.litemedsam else ("TINY" if args.tiny else "ViT-B")
    phantom = ellipsoid(tuple(args.shape), (0.8, 0.8, 1.0), (90.0, 70.0, 120.0))
    volume = Volume(phantom.image, phantom.ijk_to_ras, "bench")
    print(
        f"volume {volume.shape} {volume.array.dtype}, model {label}"
        f", {torch.get_num_threads()} threads;"
        f" peak RSS after set-up {peak_rss_gib():.2f} GiB"
    )
    session = SegmentationSession(volume, predictor, "axial")
    if args.litemedsam:
        return box_run(session, phantom)
    middle = volume.shape[0] // 2
    first, last = middle - args.span // 2, middle + (args.span - args.span // 2)
    seeds = {first: phantom.mask[first], last: phantom.mask[last]}
    start = time.perf_counter()
    result = propagate(session, seeds, PropagationOptions(projection="mask"))
    wall = time.perf_counter() - start
    stats = session.stats
    calls_per_slice = stats.encoder_calls / max(1, len(result.requested))
    print(
        f"propagated {len(result.requested)} slices in {wall:.2f} s;"
        f" encoder {stats.encoder_seconds:.2f} s"
        f" in {stats.encoder_calls} calls"
    )
    print(
        f"overhead ratio (wall / encoder time): {wall / stats.encoder_seconds:.3f}"
        "   (target <= 1.10)"
    )
    print(f"encoder calls per propagated slice: {calls_per_slice:.2f}   (target 1.0)")
    clicks = []
    rng = np.random.default_rng(0)
    for _ in range(10):
        x, y = rng.uniform(150, 350, 2)
        t0 = time.perf_counter()
        session.click(middle, (x, y))
        clicks.append(time.perf_counter() - t0)
    print(f"click latency on an encoded slice: median {1e3 * statistics.median(clicks):.0f} ms")
    print(
        f"peak RSS {peak_rss_gib():.2f} GiB; embedding cache holds "
        f"{sum(e.features.nbytes for e in session._cache.values()) / 1024**2:.0f} MiB of "
        f"{session.cache_bytes / 1024**3:.1f} GiB allowed"
    )


def box_run(session: SegmentationSession, phantom) -> None:
    """One 3D box around the object (its extent + 1 voxel), propagated: wall time, Dice."""
    from RobustMedSAMLib.inference.segment_volume import (
        SegmentOptions,
        VolumePrompts,
        segment_volume,
    )

    volume = session.volume
    kji = np.argwhere(phantom.mask)
    roi = ijk_box_roi(volume, kji.min(axis=0)[::-1] - 1.0, kji.max(axis=0)[::-1] + 1.0)
    start = time.perf_counter()
    result = segment_volume(session, VolumePrompts(roi=roi), SegmentOptions(propagate=True))
    wall = time.perf_counter() - start
    truth = phantom.mask
    dice = 2 * (result.mask & truth).sum() / (result.mask.sum() + truth.sum())
    print(
        f"one box, propagated over {len(result.slices)} slices in {wall:.2f} s "
        f"(encoder {session.stats.encoder_seconds:.2f} s, {session.stats.encoder_calls} calls);"
        f" Dice against the truth {dice:.3f}"
    )


if __name__ == "__main__":
    main()
