"""Small line charts drawn with Pillow (no matplotlib needed at run time).

``draw_panels`` lays out panels in a grid, each a set of named series sharing one
legend across the figure, and writes a PNG atomically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from RobustMedSAMLib.formats.atomic import atomic_output

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")  # fmt: skip
PANEL = (330, 230)
MARGIN = (48, 24, 14, 40)  # left, top, right, bottom inside a panel
LEGEND_ROW = 18


@dataclass
class Panel:
    """One chart: ``series`` maps a label to ``(xs, ys)`` (NaN ys are gaps)."""

    title: str
    series: dict[str, tuple[Sequence[float], Sequence[float]]] = field(default_factory=dict)
    xlabel: str = ""
    ylabel: str = "Dice"
    ylim: tuple[float, float] = (0.0, 1.0)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_panels(panels: Sequence[Panel], path: str | Path, title: str, columns: int = 3) -> Path:
    """Draw ``panels`` in a grid under ``title`` and a shared legend; write PNG ``path``."""
    path = Path(path)
    labels = list(dict.fromkeys(lab for p in panels for lab in p.series))
    colours = {lab: PALETTE[i % len(PALETTE)] for i, lab in enumerate(labels)}
    columns = max(1, min(columns, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    legend_rows = math.ceil(len(labels) / 4) if labels else 0
    top = 30 + legend_rows * LEGEND_ROW
    image = Image.new("RGB", (columns * PANEL[0], top + rows * PANEL[1]), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 6), title, fill="black", font=_font(15))
    for i, label in enumerate(labels):
        x, y = 10 + (i % 4) * 240, 28 + (i // 4) * LEGEND_ROW
        draw.line((x, y + 7, x + 22, y + 7), fill=colours[label], width=3)
        draw.text((x + 28, y), label[:34], fill="black", font=_font(12))
    for n, panel in enumerate(panels):
        origin = ((n % columns) * PANEL[0], top + (n // columns) * PANEL[1])
        _draw_panel(draw, panel, origin, colours)
    with atomic_output(path) as temporary:
        image.save(temporary)
    return path


def _draw_panel(draw: ImageDraw.ImageDraw, panel: Panel, origin: tuple[int, int], colours) -> None:
    left, top = origin[0] + MARGIN[0], origin[1] + MARGIN[1]
    right, bottom = origin[0] + PANEL[0] - MARGIN[2], origin[1] + PANEL[1] - MARGIN[3]
    small = _font(11)
    draw.text((left, origin[1] + 4), panel.title[:48], fill="black", font=_font(13))
    draw.rectangle((left, top, right, bottom), outline="black")
    xs = sorted({float(x) for xy in panel.series.values() for x in xy[0]}) or [0.0, 1.0]
    x0, x1 = xs[0], xs[-1] if xs[-1] > xs[0] else xs[0] + 1
    y0, y1 = panel.ylim

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = left + (x - x0) / (x1 - x0) * (right - left)
        py = bottom - (min(max(y, y0), y1) - y0) / (y1 - y0) * (bottom - top)
        return px, py

    for k in range(6):
        value = y0 + k * (y1 - y0) / 5
        _, py = to_px(x0, value)
        draw.line((left - 4, py, left, py), fill="black")
        draw.text((origin[0] + 6, py - 6), f"{value:.1f}", fill="black", font=small)
    ticks = xs if len(xs) <= 12 else _nice_ticks(x0, x1)
    for value in ticks:
        px, _ = to_px(value, y0)
        draw.line((px, bottom, px, bottom + 4), fill="black")
        draw.text((px - 6, bottom + 6), f"{value:g}", fill="black", font=small)
    draw.text((left + 4, bottom + 22), panel.xlabel, fill="black", font=small)
    for label, (sx, sy) in panel.series.items():
        points = [to_px(float(x), float(y)) for x, y in zip(sx, sy, strict=True) if y == y]
        if len(points) > 1:
            draw.line(points, fill=colours[label], width=2)
        for px, py in points:
            draw.ellipse((px - 2.5, py - 2.5, px + 2.5, py + 2.5), fill=colours[label])


def _nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 x 10^k) covering ``low..high``."""
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step) * step
    return [first + k * step for k in range(int((high - first) / step) + 1)]
