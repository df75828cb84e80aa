"""Turning a 2D medical slice into model input, and model output back into a mask.

Three published conventions (choose the one the image encoder was trained with):

* ``"sam"`` (SAM, RobustSAM, MedicoSAM): resize the longest side to S (1024), keep
  the aspect ratio, normalise with ImageNet pixel mean/std, pad bottom-right to S x S.
* ``"medsam"`` (MedSAM, and so the fused model, whose encoder is MedSAM's): resize to
  S x S (aspect not kept), min-max scale to [0, 1], no mean/std.
* ``"litemedsam"`` (LiteMedSAM, as its authors' inference script runs it): resize the
  longest side to S (256, bilinear, rounded to 0..255 as their uint8 resize does), min-max
  scale the resized image to [0, 1], zero-pad bottom-right to S x S. Prompts are scaled by
  the one factor S / longest side; the low-res logits (S x S) are cropped to the resized
  image and resized back to the slice (bilinear).

Before either, a CT/MR slice is windowed to 0..255 (intensity window ``(low, high)``;
by default the soft-tissue preset for CT, else the 0.5-99.5 percentiles of the whole
volume, so slices are consistent: :func:`resolve_window`).
Frames: the slice is ``(rows, cols)``; prompts (x, y) in slice pixels are mapped into
model-input pixels; masks come back in slice pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from RobustMedSAMLib.errors import InputError

Style = Literal["sam", "medsam", "litemedsam"]
STYLES: tuple[str, ...] = ("sam", "medsam", "litemedsam")
LONGEST_SIDE_STYLES = ("sam", "litemedsam")
"""Styles that keep the aspect ratio and pad: their logits are cropped before resizing."""
WINDOW_FLOOR_ULPS = 16
"""Narrowest window width, in float64 steps (ulps) at the window's magnitude: a
narrower one cannot tell its own ends apart from rounding."""


WINDOW_SAMPLE = 2_000_000
"""Voxels that ``auto_window`` reads at most (evenly spaced over the array)."""


def auto_window(image: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> tuple:
    """Intensity window ``(low, high)`` from robust percentiles of a slice or volume.

    Reads at most ``WINDOW_SAMPLE`` evenly spaced voxels, converted to float64 only
    after sampling: a 512 x 512 x 300 CT is never copied whole (in float64 that copy
    alone would be 630 MB)."""
    flat = np.ravel(np.asarray(image))
    step = max(1, flat.size // WINDOW_SAMPLE)
    sample = np.asarray(flat[::step], dtype=np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0 and step > 1:  # finite voxels too sparse for the even sample
        finite = flat[np.isfinite(flat)]
        sample = np.asarray(finite[:: max(1, finite.size // WINDOW_SAMPLE)], dtype=np.float64)
    if sample.size == 0:
        raise InputError("the image has no finite intensities to window")
    with np.errstate(over="ignore", invalid="ignore"):
        low, high = np.percentile(sample, percentiles)
    if not (np.isfinite(low) and np.isfinite(high)):  # interpolation overflowed near 1.8e308
        low, high = np.percentile(sample, percentiles, method="nearest")
    if high <= low:
        high = low + 1.0
    return float(low), float(high)


# Presets as (level, width) in HU, named for what they show. Soft tissue is MedSAM's CT
# convention (level 40, width 400: -160..240 HU); the others are the usual radiology ones.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "soft_tissue": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
MR_PERCENTILES = (0.5, 99.5)  # MedSAM's rule for MR (and anything not in HU)
WINDOW_CHOICES = (*WINDOW_PRESETS, "mr", "auto")
_CT_AIR_HU = -500.0  # a CT volume holds air (about -1000 HU); MR and phantoms do not


def preset_window(name: str) -> tuple[float, float]:
    """``(low, high)`` of preset ``name`` (level -/+ width / 2)."""
    if name not in WINDOW_PRESETS:
        raise InputError(f"unknown window preset {name!r}: use one of {', '.join(WINDOW_CHOICES)}")
    level, width = WINDOW_PRESETS[name]
    return level - width / 2, level + width / 2


def looks_like_ct(array: np.ndarray, modality: str | None = None) -> bool:
    """True for a CT volume in HU: ``modality`` (DICOM ``(0008,0060)``, when the file
    says) is ``CT``, or, when it does not say, the volume holds air (1st percentile
    under -500 HU)."""
    if modality:
        return modality.strip().upper() == "CT"
    return auto_window(array, (1.0, 99.0))[0] < _CT_AIR_HU


def parse_window(spec: str | tuple[float, float] | list[float]) -> str | tuple[float, float]:
    """A ``--window`` value: a preset name (``WINDOW_CHOICES``), ``"LO,HI"`` or a pair of
    numbers -> the name or ``(low, high)``. InputError for a reversed, empty or
    non-finite range or an unknown name."""
    if isinstance(spec, str):
        text = spec.strip().lower().replace("-", "_") if "," not in spec else spec
        if text in WINDOW_CHOICES:
            return text
        parts = spec.split(",")
        if len(parts) != 2:
            raise InputError(
                f"window {spec!r}: give a preset ({', '.join(WINDOW_CHOICES)}) or LO,HI"
            )
        spec = parts
    try:
        low, high = (float(v) for v in spec)
    except (TypeError, ValueError):
        raise InputError(f"window {spec!r}: LO and HI must be two numbers") from None
    if not (np.isfinite(low) and np.isfinite(high)):
        raise InputError(f"window {low:g},{high:g}: LO and HI must be finite numbers")
    if high <= low:
        raise InputError(f"window {low:g},{high:g}: HI must be greater than LO")
    return low, high


def resolve_window(
    array: np.ndarray,
    spec: str | tuple[float, float] | list[float] | None = None,
    modality: str | None = None,
) -> tuple[tuple[float, float], str]:
    """The intensity window for ``array`` and what chose it: ``((low, high), source)``.

    ``spec`` None or ``"auto"``: the soft-tissue preset for CT (see
    :func:`looks_like_ct`), else the 0.5..99.5 percentiles (MedSAM's rule for MR);
    a preset name; ``"mr"``: the percentiles; ``"LO,HI"`` or ``(low, high)``: as given.
    ``source`` is ``"preset:NAME"``, ``"percentile:0.5..99.5"`` or ``"explicit"``.
    """
    choice = "auto" if spec is None else parse_window(spec)
    if choice == "auto":
        choice = "soft_tissue" if looks_like_ct(array, modality) else "mr"
    if choice == "mr":
        low, high = MR_PERCENTILES
        return auto_window(array, MR_PERCENTILES), f"percentile:{low}..{high}"
    if isinstance(choice, str):
        return preset_window(choice), f"preset:{choice}"
    return choice, "explicit"


def window_to_unit(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """A slice as the point search and stop rules see it: ``window`` mapped to 0..1,
    clipped, float32."""
    low, high = window
    image = np.asarray(image, dtype=np.float32)
    return np.clip((image - low) / max(high - low, 1e-6), 0.0, 1.0)


def window_to_uint8(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip a slice to ``window`` and scale it to 0..255 (uint8), NaN to 0.

    In float64, whatever the voxel type: a width that overflows float64 (a window
    near +-1.8e308) is halved with the values, and the width's floor is relative
    (WINDOW_FLOOR_ULPS float64 steps at the window's magnitude), so windows 1e-12
    or 1e-30 wide still spread over 0..255.
    """
    low, high = float(window[0]), float(window[1])
    factor = 1.0 if np.isfinite(high - low) else 0.5
    low, high = low * factor, high * factor
    floor = WINDOW_FLOOR_ULPS * np.spacing(max(abs(low), abs(high)))
    width = max(high - low, floor, np.finfo(np.float64).tiny)
    scaled = (np.asarray(image, dtype=np.float64) * factor - low) / width
    return (np.nan_to_num(np.clip(scaled, 0.0, 1.0)) * 255.0 + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class Frame:
    """Geometry of one preprocessed slice: original ``(rows, cols)`` and the resized
    ``(rows, cols)`` inside the ``S x S`` model input."""

    original_size: tuple[int, int]
    input_size: tuple[int, int]


class Preprocessor:
    """Slice -> model input tensor, slice prompts -> model frame, logits -> slice mask."""

    def __init__(
        self,
        style: Style,
        image_size: int,
        pixel_mean: tuple[float, ...],
        pixel_std: tuple[float, ...],
    ) -> None:
        if style not in STYLES:
            raise InputError(f"unknown preprocessing {style!r}; choose one of {STYLES}")
        self.style = style
        self.image_size = image_size
        self.mean = torch.tensor(pixel_mean).view(-1, 1, 1)
        self.std = torch.tensor(pixel_std).view(-1, 1, 1)

    def image(self, slice_u8: np.ndarray) -> tuple[torch.Tensor, Frame]:
        """``(rows, cols)`` uint8 slice -> ``1 x 3 x S x S`` float tensor and its frame."""
        if slice_u8.ndim != 2 or min(slice_u8.shape) < 2:
            raise InputError(f"a slice must be a 2D image of at least 2x2, got {slice_u8.shape}")
        rgb = np.repeat(slice_u8[:, :, None], 3, axis=2)
        original = (int(slice_u8.shape[0]), int(slice_u8.shape[1]))
        if self.style == "litemedsam":
            return self._lite_image(rgb, original)
        if self.style == "sam":
            # SAM's own resize (PIL, via torchvision): imported here, the lite path never pays it
            from segment_anything.utils.transforms import ResizeLongestSide

            resized = ResizeLongestSide(self.image_size).apply_image(rgb)
            resized = torch.as_tensor(resized).permute(2, 0, 1).float()
            frame = Frame(original, (resized.shape[1], resized.shape[2]))
            normalised = (resized - self.mean) / self.std
            pad = (
                0,
                self.image_size - frame.input_size[1],
                0,
                self.image_size - frame.input_size[0],
            )
            return F.pad(normalised, pad)[None], frame
        tensor = torch.as_tensor(rgb).permute(2, 0, 1)[None].float()
        size = (self.image_size, self.image_size)
        resized = F.interpolate(tensor, size, mode="bicubic", align_corners=False, antialias=True)
        resized = resized.clamp(0, 255).round()
        low, high = resized.min(), resized.max()
        return (resized - low) / (high - low).clamp(min=1e-8), Frame(original, size)

    def _lite_image(self, rgb: np.ndarray, original: tuple[int, int]) -> tuple[torch.Tensor, Frame]:
        """LiteMedSAM: longest side to S (bilinear), min-max to [0, 1], zero pad."""
        scale = self.image_size / max(original)
        size = (int(original[0] * scale + 0.5), int(original[1] * scale + 0.5))
        tensor = torch.as_tensor(rgb).permute(2, 0, 1)[None].float()
        resized = F.interpolate(tensor, size, mode="bilinear", align_corners=False)
        resized = resized.clamp(0, 255).round()
        low, high = resized.min(), resized.max()
        scaled = (resized - low) / (high - low).clamp(min=1e-8)
        pad = (0, self.image_size - size[1], 0, self.image_size - size[0])
        return F.pad(scaled, pad), Frame(original, size)

    def coords(self, xy: np.ndarray, frame: Frame) -> np.ndarray:
        """``N x 2`` (x, y) slice pixels -> model-input pixels (works for box corners too)."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        rows, cols = frame.original_size
        in_rows, in_cols = frame.input_size
        # Slice pixel centres are integers; SAM's convention maps pixel edges (x * scale).
        if self.style == "litemedsam":  # one factor, as its authors scale boxes
            return (xy * (self.image_size / max(rows, cols))).astype(np.float32)
        return (xy * np.array([in_cols / cols, in_rows / rows])).astype(np.float32)

    def grid_cover(self, masks: np.ndarray, frame: Frame, grid: tuple[int, int]) -> torch.Tensor:
        """``N x rows x cols`` slice masks -> ``N x h x w``: the fraction of each cell of the
        image embedding's ``grid`` that each mask covers, placed as the slice is in the
        model input (resized to ``frame.input_size``, antialiased so that a thin mask
        keeps its area, padded to ``S x S``)."""
        tensor = torch.as_tensor(np.asarray(masks, np.float32))[:, None]
        size = frame.input_size
        resized = F.interpolate(tensor, size, mode="bilinear", align_corners=False, antialias=True)
        pad = (0, self.image_size - frame.input_size[1], 0, self.image_size - frame.input_size[0])
        return F.adaptive_avg_pool2d(F.pad(resized, pad), grid)[:, 0]

    def mask_logits(self, low_res: torch.Tensor, frame: Frame) -> torch.Tensor:
        """``B x M x L x L`` low-res logits -> ``B x M x rows x cols`` logits on the slice."""
        if self.style in LONGEST_SIDE_STYLES:
            full = low_res
            if low_res.shape[-1] != self.image_size:
                size = (self.image_size, self.image_size)
                full = F.interpolate(low_res, size, mode="bilinear", align_corners=False)
            full = full[..., : frame.input_size[0], : frame.input_size[1]]
        else:
            full = low_res
        return F.interpolate(full, frame.original_size, mode="bilinear", align_corners=False)
