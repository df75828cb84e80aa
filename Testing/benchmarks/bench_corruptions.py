"""Time each corruption type on a 256 x 256 x 100 int16 CT-like volume.

Not a test: run ``.venv/bin/python Testing/benchmarks/bench_corruptions.py``.
Prints seconds per volume (median of the repeats) at severities 1 and 5 and
exits 1 when any type is slower than the target (2 s by default).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

from RobustMedSAMLib.corruptions import CORRUPTIONS, corrupt
from RobustMedSAMLib.datasets.phantoms import organ_scene


def seconds(volume, name: str, severity: int, repeats: int) -> float:
    times = []
    for repeat in range(repeats):
        start = time.perf_counter()
        corrupt(volume, name, severity, seed=repeat, spacing=(2.5, 0.8, 0.8))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape", type=int, nargs=3, default=(100, 256, 256), metavar=("K", "J", "I")
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--target", type=float, default=2.0, help="seconds per volume")
    args = parser.parse_args()
    volume = organ_scene(tuple(args.shape), (0.8, 0.8, 2.5), texture="ct").image
    print(
        f"volume {'x'.join(map(str, args.shape))} {volume.dtype}, median of {args.repeats}; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(f"{'type':18s} {'s1 [s]':>7s} {'s5 [s]':>7s}")
    slow = []
    for name in CORRUPTIONS:
        mild, heavy = (seconds(volume, name, s, args.repeats) for s in (1, 5))
        flag = "  SLOW" if max(mild, heavy) > args.target else ""
        print(f"{name:18s} {mild:7.2f} {heavy:7.2f}{flag}")
        if flag:
            slow.append(name)
    print(f"slower than {args.target:g} s: {', '.join(slow) or 'none'}")
    return 1 if slow else 0


if __name__ == "__main__":
    sys.exit(main())
