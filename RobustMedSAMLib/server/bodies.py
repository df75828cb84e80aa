"""Request bodies of the protocol (pydantic): a body that does not match is a 422.

Frames: ``point``/``positive``/``negative`` are RAS mm or continuous IJK indices as
``frame`` says; slices (``seeds``, ``bounds``) are indices along the session's axis.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat

from RobustMedSAMLib.inference.propagation import PropagationOptions
from RobustMedSAMLib.names import (
    DEFAULT_BOX_EXTENSION,
    DEFAULT_LIKENESS,
    DEFAULT_OVERLAP,
    DEFAULT_STABILITY,
    SEED_BOX_GROWTH,
)

Vector3 = tuple[FiniteFloat, FiniteFloat, FiniteFloat]  # NaN, Infinity: a 422


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClickRequest(_Body):
    point: Vector3
    frame: Literal["ras", "ijk"] = "ras"
    positive: bool = True


class Box(_Body):
    """RAS: ``center``, ``size`` (mm along the box axes), ``axes`` (3x3, unit axes as
    columns; default the RAS axes). IJK: ``low`` and ``high`` corners (voxel indices)."""

    center: Vector3 | None = None
    size: Vector3 | None = None
    axes: tuple[Vector3, Vector3, Vector3] | None = None
    low: Vector3 | None = None
    high: Vector3 | None = None


class Options(_Body):
    projection: Literal["mask", "box", "points", "points_and_mask", "single_point"] = "mask"
    iou_threshold: float = Field(DEFAULT_OVERLAP, ge=0, le=1)
    min_score: float = Field(0.0, ge=0, le=1)
    min_area_ratio: float = Field(0.0, ge=0, le=1)  # as PropagationOptions
    min_likeness: float = Field(DEFAULT_LIKENESS, ge=0, le=1)  # 0: off
    min_stability: float = Field(DEFAULT_STABILITY, ge=0, le=1)  # 0: off
    overlap: Literal["iou", "containment"] = "containment"
    bounds: tuple[int, int] | None = None
    max_slices: int | None = Field(None, ge=0)
    zoom: bool | Literal["auto"] = "auto"  # as SegmentOptions.zoom
    box_extension: float = Field(DEFAULT_BOX_EXTENSION, ge=0, allow_inf_nan=False)
    stop_between_seeds: bool = False
    refine_steps: int | None = Field(None, ge=0, le=8)  # None: the pipeline's default
    slice_step: int = Field(1, ge=1, strict=True)  # ask every N-th slice, fill the rest

    def propagation(self) -> PropagationOptions:
        values = self.model_dump(exclude={"zoom", "seed_box_growth"})
        return PropagationOptions(**values)


class SegmentRequestOptions(Options):
    """The segment body's options: the propagation ones and ``seed_box_growth``, the
    fraction each side of a box drawn on one slice moves out by before the first ask (as
    ``SegmentOptions.seed_box_growth``; 0: off). The propagate body starts from masks,
    not a drawn box, and refuses it."""

    seed_box_growth: float = Field(SEED_BOX_GROWTH, ge=0, allow_inf_nan=False)


class SegmentRequest(_Body):
    frame: Literal["ras", "ijk"] = "ras"
    positive: list[Vector3] | None = None
    negative: list[Vector3] | None = None
    box: Box | None = None
    propagate: bool = False
    options: SegmentRequestOptions = SegmentRequestOptions()


class PropagateRequest(_Body):
    seeds: list[int] = Field(min_length=1)
    options: Options = Options()


class EncodeRequest(_Body):
    seeds: list[int] = Field(min_length=1)
    bounds: tuple[int, int] | None = None
    slice_step: int = Field(1, ge=1, strict=True)  # as Options: the slices jumps will ask


class MaskRequest(_Body):
    patch: dict[str, Any]
