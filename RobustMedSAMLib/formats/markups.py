"""Prompts from Slicer markups JSON (``.mrk.json``), as Slicer saves them.

A file holds ``{"@schema": ..., "markups": [...]}``; each markup has a
``type`` (``Fiducial`` for a point list, ``ROI``, ``Line``, ...), the
``coordinateSystem`` its numbers are in (``LPS`` or ``RAS``), and
``controlPoints`` with ``position`` and ``positionStatus``. An ROI adds
``center``, ``size`` (mm along its own axes) and ``orientation``: 9 numbers,
a row-major 3x3 matrix whose columns are the ROI's X, Y, Z axes.

Everything returned here is RAS millimetres.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.formats.atomic import write_json

SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
    "Resources/Schema/markups-schema-v1.0.3.json#"
)
POINT_LIST_TYPES = ("Fiducial", "PointList")
_TO_RAS = {"RAS": np.array([1.0, 1.0, 1.0]), "LPS": np.array([-1.0, -1.0, 1.0])}


@dataclass
class Roi:
    """A box in RAS mm: centre, edge lengths along its axes, and the axes.

    center_ras: ``(3,)``; size: ``(3,)`` mm along the box's X, Y, Z axes;
    axes_ras: ``3x3`` with the unit X, Y, Z axes as columns.
    """

    center_ras: np.ndarray
    size: np.ndarray
    axes_ras: np.ndarray

    def __post_init__(self) -> None:
        self.center_ras = _roi_field(self.center_ras, (3,), "center_ras")
        self.size = _roi_field(self.size, (3,), "size")
        self.axes_ras = _roi_field(self.axes_ras, (3, 3), "axes_ras")
        if (self.size < 0).any():
            raise InputError(f"ROI size {self.size.tolist()} has a negative length: give mm >= 0")
        if not np.allclose(np.linalg.norm(self.axes_ras, axis=0), 1.0, atol=1e-4):
            raise InputError(
                "ROI axes_ras columns must be unit vectors (the box's X, Y, Z directions), "
                f"not {np.round(self.axes_ras, 4).tolist()}: divide each by its length"
            )
        with np.errstate(over="ignore", invalid="ignore"):  # finite fields, corners past float
            corners = self.corners_ras()
        if not np.isfinite(corners).all():
            raise InputError(
                f"ROI centre {_short(self.center_ras.tolist())} and size "
                f"{_short(self.size.tolist())} mm put its corners past any number: give mm"
            )

    def corners_ras(self) -> np.ndarray:
        """The 8 corners, ``8x3`` RAS mm."""
        signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
        return self.center_ras + (signs * (np.asarray(self.size) / 2.0)) @ self.axes_ras.T


def _roi_field(value: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    """``value`` as a float64 array of ``shape`` with finite numbers; InputError naming
    the ROI field otherwise."""
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        array = None
    if array is None or array.shape != shape or not np.isfinite(array).all():
        wanted = "3 numbers" if shape == (3,) else "a 3x3 matrix"
        shown = value.tolist() if isinstance(value, np.ndarray) else value
        raise InputError(f"ROI {name} must be {wanted}, all finite, not {_short(shown)}")
    return array


def read_points(path: str | os.PathLike) -> np.ndarray:
    """The defined control points of the point lists in ``path``: ``Nx3`` RAS mm.

    Points whose ``positionStatus`` is not ``defined`` (placed later, skipped)
    are left out. Raises InputError when the file holds no point list (naming
    what it holds instead) or no defined point.
    """
    markups = _read_markups(path)
    lists = [m for m in markups if m.get("type") in POINT_LIST_TYPES]
    if not lists:
        raise InputError(
            f"{path} holds {_describe(markups)}: a point list (Slicer 'Point List', type "
            "'Fiducial') is expected" + (" — give an ROI as a box" if _has_roi(markups) else "")
        )
    points = [p for markup in lists for p in _defined_points(markup, path)]
    if not points:
        raise InputError(f"{path} has no placed (defined) control point")
    return np.array(points, dtype=np.float64).reshape(-1, 3)


def read_roi(path: str | os.PathLike) -> Roi:
    """The single ROI in ``path`` as an :class:`Roi` in RAS."""
    markups = _read_markups(path)
    rois = [m for m in markups if m.get("type") == "ROI"]
    if not rois:
        raise InputError(f"{path} holds {_describe(markups)}: an ROI (box) is expected")
    if len(rois) > 1:
        raise InputError(f"{path} holds {len(rois)} ROIs: give a file with one")
    return _roi(rois[0], path)


def write_points(
    path: str | os.PathLike,
    points_ras: np.ndarray,
    labels: list[str] | None = None,
    coordinate_system: str = "LPS",
) -> Path:
    """Write ``Nx3`` RAS points as a Slicer point list (``.mrk.json``), atomically.

    ``labels`` names the points (default ``P-1``, ``P-2``, ...);
    ``coordinate_system`` is ``LPS`` (what Slicer writes) or ``RAS``.
    """
    points = np.asarray(points_ras, dtype=np.float64).reshape(-1, 3)
    if coordinate_system not in _TO_RAS:
        raise InputError(f"coordinate system must be LPS or RAS, not {coordinate_system!r}")
    labels = labels if labels is not None else [f"P-{n + 1}" for n in range(len(points))]
    if len(labels) != len(points):
        raise InputError(f"{len(points)} points but {len(labels)} labels")
    flip = _TO_RAS[coordinate_system]
    control_points = [
        {
            "id": str(n + 1),
            "label": str(label),
            "position": (point * flip).tolist(),
            "selected": True,
            "locked": False,
            "visibility": True,
            "positionStatus": "defined",
        }
        for n, (point, label) in enumerate(zip(points, labels, strict=True))
    ]
    document = {
        "@schema": SCHEMA,
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": coordinate_system,
                "coordinateUnits": "mm",
                "controlPoints": control_points,
            }
        ],
    }
    return write_json(path, document, indent=4)  # as Slicer writes markups


def write_roi(path: str | os.PathLike, roi: Roi, label: str = "R") -> Path:
    """Write an ROI (box) as a Slicer markups ROI (``.mrk.json``, LPS as Slicer saves
    it), atomically. (Slicer-core read a rotated ROI written in RAS with other axes
    than it writes itself, so only LPS is offered.)"""
    coordinate_system = "LPS"
    flip = _TO_RAS[coordinate_system]
    center = np.asarray(roi.center_ras, np.float64) * flip
    axes = np.asarray(roi.axes_ras, np.float64) * flip[:, None]  # columns: ROI axes
    markup = {
        "type": "ROI",
        "coordinateSystem": coordinate_system,
        "coordinateUnits": "mm",
        "roiType": "Box",
        "center": center.tolist(),
        "orientation": axes.ravel().tolist(),
        "size": np.abs(np.asarray(roi.size, np.float64)).tolist(),
        "insideOut": False,
        "controlPoints": [
            {
                "id": "1",
                "label": label,
                "position": center.tolist(),
                "orientation": axes.ravel().tolist(),
                "selected": True,
                "locked": False,
                "visibility": True,
                "positionStatus": "defined",
            }
        ],
    }
    return write_json(path, {"@schema": SCHEMA, "markups": [markup]}, indent=4)


def _read_markups(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"markups file not found: {path}")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path} is not valid markups JSON: {error}") from None
    except RecursionError:
        raise InputError(f"{path} is not markups JSON: it is nested too deeply") from None
    except OSError as error:
        raise InputError(f"cannot read markups file {path}: {error.strerror}") from None
    markups = document.get("markups") if isinstance(document, dict) else None
    if not isinstance(markups, list) or not markups:
        raise InputError(f"{path} has no 'markups' list: save the markups from Slicer as .mrk.json")
    if not all(isinstance(m, dict) for m in markups):
        raise InputError(f"{path}: every entry of 'markups' must be an object")
    return markups


def _describe(markups: list[dict[str, Any]]) -> str:
    kinds = sorted({str(m.get("type", "untyped")) for m in markups})
    return "markups of type " + ", ".join(repr(k) for k in kinds)


def _has_roi(markups: list[dict[str, Any]]) -> bool:
    return any(m.get("type") == "ROI" for m in markups)


def _flip(markup: dict[str, Any], path: str | os.PathLike) -> np.ndarray:
    """Per-axis signs that take the markup's coordinates to RAS."""
    system = markup.get("coordinateSystem", "LPS")
    if not isinstance(system, str) or system not in _TO_RAS:
        raise InputError(f"{path}: unknown coordinateSystem {system!r} (expected LPS or RAS)")
    return _TO_RAS[system]


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for a message that stays one line."""
    text = repr(value) if not isinstance(value, str) else value
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _vector(value: Any, count: int, what: str, path: str | os.PathLike) -> np.ndarray:
    try:
        vector = np.asarray(value, dtype=np.float64).reshape(count)
    except (TypeError, ValueError, OverflowError, RecursionError):
        raise InputError(f"{path}: {what} must be {count} numbers, not {_short(value)}") from None
    if not np.isfinite(vector).all():
        raise InputError(f"{path}: {what} has non-finite values {_short(value)}")
    return vector


def _defined_points(markup: dict[str, Any], path: str | os.PathLike) -> list[np.ndarray]:
    flip = _flip(markup, path)
    control_points = markup.get("controlPoints") or []
    if not isinstance(control_points, list) or not all(isinstance(p, dict) for p in control_points):
        raise InputError(
            f"{path}: 'controlPoints' must be a list of objects, not {_short(control_points)}"
        )
    points = []
    for n, point in enumerate(control_points):
        if point.get("positionStatus", "defined") != "defined":
            continue
        label = _short(point.get("label") or f"#{n + 1}", 40)
        points.append(_vector(point.get("position"), 3, f"point {label} position", path) * flip)
    return points


def _roi(markup: dict[str, Any], path: str | os.PathLike) -> Roi:
    flip = _flip(markup, path)
    orientation = markup.get("orientation", np.eye(3).ravel().tolist())
    axes = _vector(orientation, 9, "ROI orientation", path).reshape(3, 3) * flip[:, None]
    if not np.allclose(axes.T @ axes, np.eye(3), atol=1e-4):
        raise InputError(
            f"{path}: ROI orientation {_short(orientation)} is not a rotation (its axes must "
            "be orthogonal unit vectors): save the ROI from Slicer again"
        )
    if "center" in markup and "size" in markup:
        center = _vector(markup["center"], 3, "ROI center", path) * flip
        size = np.abs(_vector(markup["size"], 3, "ROI size", path))
    else:
        points = _defined_points(markup, path)
        if len(points) < 2:
            raise InputError(f"{path}: the ROI has neither center/size nor two control points")
        local = np.array(points) @ axes  # coordinates along the ROI axes
        low, high = local.min(axis=0), local.max(axis=0)
        center, size = axes @ ((low + high) / 2.0), high - low
    return Roi(center_ras=center, size=size, axes_ras=axes)
