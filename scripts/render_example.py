"""Draw the README's picture: a volume with a segmentation's outline, three views.

    .venv/bin/python scripts/render_example.py VOLUME SEGMENTATION OUT.png [TRUTH]

Green: the segmentation; magenta (optional): a reference mask. Each view passes
through the reference's centre (the segmentation's without one).
"""

from __future__ import annotations

import sys

import numpy as np
from PIL import Image
from scipy import ndimage

from RobustMedSAMLib.formats.segmentation import read_segmentation
from RobustMedSAMLib.formats.volume import read_volume
from RobustMedSAMLib.inference.preprocessing import auto_window, window_to_uint8

GREEN, MAGENTA = (60, 230, 90), (230, 60, 200)


def outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def view(image: np.ndarray, masks: list[tuple[np.ndarray, tuple]], aspect: float) -> Image.Image:
    rgb = np.repeat(image[:, :, None], 3, axis=2)
    for mask, colour in masks:
        rgb[outline(mask)] = colour
    picture = Image.fromarray(rgb[::-1])  # superior / anterior up
    height = max(1, round(picture.height * aspect))
    return picture.resize((picture.width * 3, height * 3), Image.NEAREST)


def main(volume_path: str, seg_path: str, out_path: str, truth_path: str | None = None) -> None:
    volume = read_volume(volume_path)
    masks = [(read_segmentation(seg_path)[0] > 0, GREEN)]
    near = ndimage.binary_dilation(masks[0][0], iterations=8)  # window on the object's surroundings
    image = window_to_uint8(volume.array, auto_window(volume.array[near], (1.0, 99.0)))
    if truth_path:
        masks.append((read_segmentation(truth_path)[0] > 0, MAGENTA))
    k, j, i = np.round(np.argwhere(masks[-1][0]).mean(axis=0)).astype(int)
    sx, sy, sz = volume.spacing
    panels = [
        view(image[k][::-1], [(m[k][::-1], c) for m, c in masks], sy / sx),
        view(image[:, j, :], [(m[:, j, :], c) for m, c in masks], sz / sx),
        view(image[:, :, i], [(m[:, :, i], c) for m, c in masks], sz / sy),
    ]
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 20, max(p.height for p in panels)))
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, 0))
        x += panel.width + 10
    sheet.save(out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
