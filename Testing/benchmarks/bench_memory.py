"""Peak memory of ``robustmedsam segment --propagate`` from a box on a 512 x 512 x 300 CT.

Not a test (minutes on 2 CPU cores: the model encodes every slice the object covers):

    PYTHONPATH=. .venv/bin/python Testing/benchmarks/bench_memory.py [--workdir DIR]
        [--model litemedsam] [--slices 300]

Writes a synthetic CT (int16, 0.7 x 0.7 x 2.5 mm, a body ellipse of soft tissue at
40 HU with a 120 HU ellipsoid "organ" spanning about 14 slices) and a box around the
organ, runs the command under ``/usr/bin/time -v`` in a fresh process, and prints its
peak resident set size against the issue's target (1.5 GB) and against the reference
measured in the same run: a process that only imports the library, reads the volume
and writes an empty segmentation of its size (the floor any segment run pays). The
volume's own size is printed beside them.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TARGET_BYTES = 1.5e9
SPACING = (0.7, 0.7, 2.5)  # mm along I, J, K
ORGAN = ((256.0, 300.0, 150.0), (60.0, 45.0, 7.0))  # centre (I, J, K) and semi-axes, voxels


def make_inputs(folder: Path, slices: int) -> tuple[Path, Path]:
    """The CT (``ct.nrrd``) and the box (``box.mrk.json``) in ``folder``."""
    from RobustMedSAMLib.formats.markups import Roi, write_roi
    from RobustMedSAMLib.formats.volume import Volume, write_volume

    k, j, i = np.ogrid[:slices, :512, :512]
    body = ((i - 256) / 230.0) ** 2 + ((j - 256) / 180.0) ** 2 <= 1
    (ci, cj, ck), (ai, aj, ak) = ORGAN
    organ = ((i - ci) / ai) ** 2 + ((j - cj) / aj) ** 2 + ((k - ck) / ak) ** 2 <= 1
    rng = np.random.default_rng(0)
    array = np.full((slices, 512, 512), -1000, np.int16)
    array[np.broadcast_to(body, array.shape)] = 40
    array[organ] = 120
    array += rng.normal(0, 10, array.shape).astype(np.int16)
    ijk_to_ras = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])  # LPS file, RAS here
    volume = Volume(array, ijk_to_ras, "synthetic_ct", "CT")
    ct = write_volume(volume, folder / "ct.nrrd")
    centre = ijk_to_ras @ np.array([ci, cj, ck, 1.0])
    size = 2 * np.array([ai + 3, aj + 3, ak]) * np.array(SPACING)
    box = write_roi(folder / "box.mrk.json", Roi(centre[:3], size, np.eye(3)), "organ")
    return ct, box


def peak_rss(command: list[str]) -> tuple[int, str]:
    """Peak RSS in bytes of ``command`` (``/usr/bin/time -v``) and its stderr's tail."""
    run = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr)
    if run.returncode != 0 or match is None:
        raise SystemExit(f"{' '.join(command)} failed:\n{run.stderr[-3000:]}")
    return int(match.group(1)) * 1024, run.stderr


REFERENCE = """
import sys
import numpy as np
from RobustMedSAMLib.formats.volume import read_volume
from RobustMedSAMLib.formats.segmentation import write_segmentation
volume = read_volume(sys.argv[1])
write_segmentation(sys.argv[2], np.zeros(volume.shape, np.uint8), volume)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--slices", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.workdir or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        ct, box = make_inputs(folder, args.slices)
        python = sys.executable
        reference, _ = peak_rss([python, "-c", REFERENCE, str(ct), str(folder / "empty.seg.nrrd")])
        segment = [python, "-m", "RobustMedSAMLib", "segment", str(ct), "--box", str(box),
                   "--propagate", "--model", args.model, "--device", "cpu",
                   "--out", str(folder / "out.seg.nrrd")]  # fmt: skip
        peak, log = peak_rss(segment)
    voxels = args.slices * 512 * 512
    wall = re.search(r"Elapsed \(wall clock\) time.*: (\S+)", log)
    print(f"volume 512 x 512 x {args.slices} int16: {voxels * 2 / 1e6:.0f} MB")
    print(f"reference (read + write an empty segmentation): peak RSS {reference / 1e9:.2f} GB")
    wall_text = wall.group(1) if wall else "?"
    print(
        f"segment --propagate --model {args.model}: peak RSS {peak / 1e9:.2f} GB "
        f"({peak / reference:.2f}x the reference), wall {wall_text}"
    )
    verdict = "meets" if peak < TARGET_BYTES else "misses"
    print(f"target 1.5 GB: {verdict} ({peak / TARGET_BYTES:.2f} of it)")


if __name__ == "__main__":
    main()
