"""Regenerate the bundled sample case (a synthetic abdomen CT phantom and prompts).

.venv/bin/python scripts/make_samples.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from RobustMedSAMLib.datasets.phantoms import organ_scene
from RobustMedSAMLib.formats.markups import Roi, write_points, write_roi
from RobustMedSAMLib.formats.segmentation import Segment, write_segmentation
from RobustMedSAMLib.formats.volume import Volume, write_volume

HERE = Path(__file__).resolve().parents[1] / "Resources" / "samples"


def main() -> None:
    phantom = organ_scene(target="liver", seed=7)
    volume = Volume(phantom.image, phantom.ijk_to_ras, "abdomen_phantom")
    write_volume(volume, HERE / "abdomen_phantom.nrrd")
    # One include point at the deepest point of the liver on its central slice.
    from scipy import ndimage

    k = int(np.argmax(phantom.mask.sum(axis=(1, 2))))
    depth = ndimage.distance_transform_edt(phantom.mask[k])
    j, i = np.unravel_index(np.argmax(depth), depth.shape)
    write_points(HERE / "liver_point.mrk.json", volume.ijk_to_ras_points([[i, j, k]]), ["liver"])
    # A box around the liver (its 3D bounding box plus one voxel), as an ROI.
    kji = np.argwhere(phantom.mask)
    low, high = (
        volume.ijk_to_ras_points((kji.min(0) - 1)[::-1]),
        volume.ijk_to_ras_points((kji.max(0) + 1)[::-1]),
    )
    roi = Roi(center_ras=(low + high)[0] / 2, size=np.abs(high - low)[0], axes_ras=np.eye(3))
    write_roi(HERE / "liver_box.mrk.json", roi, "liver")
    truth = Segment(1, "liver", (0.87, 0.51, 0.40))
    truth_mask = phantom.mask.astype(np.uint8)
    write_segmentation(HERE / "liver_truth.seg.nrrd", truth_mask, volume, [truth])


if __name__ == "__main__":
    main()
