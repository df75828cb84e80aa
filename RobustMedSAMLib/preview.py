"""Robustness preview: how much a corruption changes the model's mask on a slice.

Frame: slice pixels. A slice is ``(rows, cols)`` raw intensities; prompts and
masks follow ``prediction.py`` (points ``(x, y) = (col, row)``). The predictor is
any object with ``set_image(slice)`` and ``predict(prompt) -> Prediction``.
The contact sheet is drawn with Pillow only.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from RobustMedSAMLib.corruptions import CORRUPTIONS, corrupt
from RobustMedSAMLib.corruptions.intensity import robust_range
from RobustMedSAMLib.errors import CancelledError, InputError
from RobustMedSAMLib.evaluation.metrics import dice
from RobustMedSAMLib.prediction import Prediction, SlicePrompt

log = logging.getLogger(__name__)

CLEAN_OUTLINE = (0, 220, 255)
CORRUPTED_OUTLINE = (255, 210, 0)
POSITIVE_POINT = (0, 255, 0)
NEGATIVE_POINT = (255, 60, 60)


class SlicePredictor(Protocol):
    """Segments one 2D slice: ``set_image`` once, then ``predict`` per prompt."""

    def set_image(self, image: np.ndarray) -> None:
        """Take a ``(rows, cols)`` raw-intensity slice."""
        ...

    def predict(self, prompt: SlicePrompt) -> Prediction:
        """The mask for ``prompt`` on the current slice."""
        ...


@dataclass
class RobustnessPreview:
    """One corruption's effect on one slice.

    clean, corrupted: ``(rows, cols)`` slices in the input's dtype; clean_mask,
    corrupted_mask: ``(rows, cols)`` bool masks the model gave on each; dice:
    overlap of the two masks (1.0 = the corruption changed nothing).
    """

    corruption: str
    severity: int
    clean: np.ndarray
    corrupted: np.ndarray
    clean_mask: np.ndarray
    corrupted_mask: np.ndarray
    dice: float


def _check_inputs(image: np.ndarray, prompt: SlicePrompt) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2:
        raise InputError(f"the preview needs one 2D slice (rows, cols), got shape {image.shape}")
    if prompt.is_empty:
        raise InputError("the preview needs a prompt: give at least one point or a box")
    return image


def _mask_of(predictor: SlicePredictor, image: np.ndarray, prompt: SlicePrompt) -> np.ndarray:
    predictor.set_image(image)
    return np.asarray(predictor.predict(prompt).mask, bool)


def preview_corruption(
    image: np.ndarray,
    prompt: SlicePrompt,
    predictor: SlicePredictor,
    name: str,
    severity: int,
    seed: int = 0,
    spacing: Sequence[float] | None = None,
    clean_mask: np.ndarray | None = None,
) -> RobustnessPreview:
    """Segment ``image`` (rows, cols) clean and corrupted with the same prompt.

    spacing: ``(row, col)`` pixel size in mm. ``clean_mask`` reuses a mask
    already computed on the clean slice (saves one encoder run).
    """
    image = _check_inputs(image, prompt)
    corrupted = corrupt(image, name, severity, seed=seed, spacing=spacing)
    if clean_mask is None:
        clean_mask = _mask_of(predictor, image, prompt)
    corrupted_mask = _mask_of(predictor, corrupted, prompt)
    overlap = dice(clean_mask, corrupted_mask)
    log.debug("%s severity %d: Dice %.3f", name, severity, overlap)
    return RobustnessPreview(
        name, int(severity), image, corrupted, clean_mask, corrupted_mask, overlap
    )


def _cancelled(cancel: Callable[[], bool] | threading.Event | None) -> bool:
    if cancel is None:
        return False
    return cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())


def preview_all(
    image: np.ndarray,
    prompt: SlicePrompt,
    predictor: SlicePredictor,
    severity: int,
    seed: int = 0,
    spacing: Sequence[float] | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | threading.Event | None = None,
) -> list[RobustnessPreview]:
    """``preview_corruption`` for every type at ``severity``, in ``CORRUPTIONS`` order.

    The clean slice is segmented once. ``progress(done, total)`` counts model
    runs (1 clean + 12 corrupted); ``cancel`` raises CancelledError between runs.
    """
    image = _check_inputs(image, prompt)
    total = len(CORRUPTIONS) + 1
    clean_mask = _mask_of(predictor, image, prompt)
    if progress:
        progress(1, total)
    previews = []
    for done, name in enumerate(CORRUPTIONS, start=2):
        if _cancelled(cancel):
            raise CancelledError("robustness preview cancelled; nothing was written")
        previews.append(
            preview_corruption(
                image, prompt, predictor, name, severity, seed, spacing, clean_mask=clean_mask
            )
        )
        if progress:
            progress(done, total)
    return previews


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (image borders count as outside)."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    return mask & ~interior


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError, ImportError):  # Pillow without FreeType
        return ImageFont.load_default()


def _tile_image(
    slice_: np.ndarray,
    window: tuple[float, float],
    masks: Sequence[tuple[np.ndarray, tuple[int, int, int]]],
    size: tuple[int, int],
) -> Image.Image:
    """The slice windowed to grey, resized to ``size`` (width, height), with outlines."""
    low, high = window
    grey = np.clip((slice_.astype(np.float32) - low) / (high - low), 0, 1)
    rgb = np.asarray(
        Image.fromarray(np.rint(grey * 255).astype(np.uint8))
        .convert("RGB")
        .resize(size, Image.Resampling.BILINEAR)
    ).copy()
    for mask, colour in masks:
        scaled = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
        rgb[_outline(np.asarray(scaled) > 0)] = colour
    return Image.fromarray(rgb)


def _draw_prompt(
    draw: ImageDraw.ImageDraw, prompt: SlicePrompt, scale: float, corner: tuple[int, int]
) -> None:
    """Points as crosses and the box as a rectangle, slice pixels scaled into the
    tile whose image starts at ``corner`` (left, top) of the sheet."""

    def place(x: float, y: float) -> tuple[float, float]:
        return (x + 0.5) * scale - 0.5 + corner[0], (y + 0.5) * scale - 0.5 + corner[1]

    for (x, y), label in zip(prompt.points, prompt.labels, strict=True):
        cx, cy = place(float(x), float(y))
        colour = POSITIVE_POINT if label == 1 else NEGATIVE_POINT
        draw.line([(cx - 4, cy), (cx + 4, cy)], fill=colour, width=2)
        draw.line([(cx, cy - 4), (cx, cy + 4)], fill=colour, width=2)
    if prompt.box is not None:
        x0, y0 = place(float(prompt.box[0]), float(prompt.box[1]))
        x1, y1 = place(float(prompt.box[2]), float(prompt.box[3]))
        draw.rectangle([x0, y0, x1, y1], outline=POSITIVE_POINT)


def contact_sheet(
    previews: Sequence[RobustnessPreview],
    prompt: SlicePrompt | None = None,
    tile_size: int = 192,
    columns: int = 4,
) -> Image.Image:
    """A grid of tiles: the clean slice first, then each corrupted slice.

    Every tile shows the slice (windowed to the clean slice's 0.5..99.5
    percentile range, so contrast changes stay visible), the clean mask outline
    (cyan), the corrupted slice's mask outline (yellow), the prompt, and a
    caption with the type, severity and Dice. ``tile_size`` is the longer side.
    """
    if not previews:
        raise InputError("no previews to draw: run preview_all or preview_corruption first")
    first = previews[0]
    rows, cols = first.clean.shape
    scale = tile_size / max(rows, cols)
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))
    caption = 16
    scale_range = robust_range(first.clean)
    window = (scale_range.low, scale_range.high)
    tiles = [("clean", first.clean, [(first.clean_mask, CLEAN_OUTLINE)])]
    for item in previews:
        label = f"{item.corruption} s{item.severity}  Dice {item.dice:.2f}"
        masks = [(item.clean_mask, CLEAN_OUTLINE), (item.corrupted_mask, CORRUPTED_OUTLINE)]
        tiles.append((label, item.corrupted, masks))
    grid_rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * size[0], grid_rows * (size[1] + caption)), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    font = _font(11)
    for index, (label, slice_, masks) in enumerate(tiles):
        left = (index % columns) * size[0]
        top = (index // columns) * (size[1] + caption)
        sheet.paste(_tile_image(slice_, window, masks, size), (left, top + caption))
        draw.text((left + 3, top + 2), label, fill=(255, 255, 255), font=font)
        if prompt is not None:
            _draw_prompt(draw, prompt, scale, (left, top + caption))
    return sheet


def write_contact_sheet(
    previews: Sequence[RobustnessPreview],
    path: str | os.PathLike,
    prompt: SlicePrompt | None = None,
    tile_size: int = 192,
    columns: int = 4,
) -> Path:
    """Draw ``contact_sheet`` and save it as PNG at ``path`` (atomically). Returns the path."""
    from RobustMedSAMLib.atomic_files import atomic_output

    path = Path(path)
    sheet = contact_sheet(previews, prompt, tile_size, columns)
    with atomic_output(path) as temporary:
        sheet.save(temporary, format="PNG")
    return path
