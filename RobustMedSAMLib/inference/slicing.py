"""Slices of a volume along one of its own voxel axes, and prompts mapped onto them.

Frames: the volume array is KJI; ``axis`` is a numpy axis of it (0 = K,
1 = J, 2 = I). A slice is 2D ``(rows, cols)``:

- axis 0: ``array[k]``        rows = J, cols = I
- axis 1: ``array[:, j, :]``  rows = K, cols = I
- axis 2: ``array[:, :, i]``  rows = K, cols = J

A point in a slice is ``(x, y) = (col, row)`` pixels, a box ``(x0, y0, x1, y1)``.
Prompts arrive in RAS mm and are mapped through the volume's geometry.
"""

from __future__ import annotations

import itertools

import numpy as np

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.formats.markups import Roi
from RobustMedSAMLib.formats.volume import Volume
from RobustMedSAMLib.inference.types import SlicePrompt
from RobustMedSAMLib.names import AXIS_NAMES

_NORMAL_RAS = {"sagittal": 0, "coronal": 1, "axial": 2}  # R, A, S component of the normal
_IN_PLANE = {0: (2, 1), 1: (2, 0), 2: (1, 0)}  # numpy axis -> numpy axes of (x, y)
HALF_VOXEL = 0.5
MIN_SLICE_SIDE = 8
"""Fewest rows or columns a slice needs. Slices 2 or 3 voxels high (a thin volume cut
across) come out stretched many times over in the model input and their masks miss
the prompt; 10-row slices of a 0.5 x 0.5 x 7 mm volume segment well."""


def anatomical_axes(volume: Volume) -> dict[str, int]:
    """Map each of axial, coronal, sagittal to a distinct numpy axis of ``volume``.

    The voxel axes (I, J, K directions of ``ijk_to_ras``) are matched to the
    R, A, S normals so that the summed ``|cos|`` of the three pairs is largest;
    for an oblique or sagittally acquired volume this picks the voxel axis
    closest to each anatomical normal.
    """
    directions = volume.ijk_to_ras[:3, :3] / volume.spacing  # columns: unit I, J, K in RAS
    alignment = np.abs(directions)  # [ras component, ijk axis]
    best = max(
        itertools.permutations(range(3)),
        key=lambda ijk_of_ras: sum(alignment[ras, ijk] for ras, ijk in enumerate(ijk_of_ras)),
    )
    return {name: 2 - best[ras] for name, ras in _NORMAL_RAS.items()}


def axis_index(volume: Volume, name: str) -> int:
    """The numpy axis (0=K, 1=J, 2=I) to slice ``volume`` along for view ``name``."""
    if name not in AXIS_NAMES:
        raise InputError(f"axis must be one of {', '.join(AXIS_NAMES)}, not {name!r}")
    return anatomical_axes(volume)[name]


def check_slice_size(volume: Volume, axis: int) -> None:
    """Raise InputError naming the axis (and one that works) when slices along
    ``axis`` have a side under MIN_SLICE_SIDE voxels."""
    _check_axis(axis)
    rows, cols = (volume.shape[a] for a in _IN_PLANE[axis][::-1])
    if min(rows, cols) >= MIN_SLICE_SIDE:
        return
    names = {index: name for name, index in anatomical_axes(volume).items()}
    thin = names[_IN_PLANE[axis][1] if rows < cols else _IN_PLANE[axis][0]]
    working = [
        names[a] for a in (0, 1, 2) if min(volume.shape[b] for b in _IN_PLANE[a]) >= MIN_SLICE_SIDE
    ]
    advice = f"use --axis {working[0]}" if working else "no axis gives slices that large"
    raise InputError(
        f"volume '{volume.name}' ({'x'.join(map(str, volume.shape[::-1]))} voxels) is "
        f"{min(rows, cols)} voxels thick across its {thin} slices, so its {names[axis]} "
        f"slices are {rows}x{cols}: too small for the model (at least {MIN_SLICE_SIDE} on a "
        f"side); {advice}"
    )


def get_slice(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The 2D slice ``index`` along ``axis`` of a KJI array: a view, ``(rows, cols)``."""
    return array[_slicer(array, axis, index)]


def set_slice(array: np.ndarray, axis: int, index: int, values: np.ndarray) -> None:
    """Write ``values`` ``(rows, cols)`` into slice ``index`` along ``axis`` of ``array``."""
    key = _slicer(array, axis, index)
    target = array[key]
    if np.shape(values) != target.shape:
        raise InputError(
            f"slice values have shape {np.shape(values)}, slice {index} along axis {axis} "
            f"is {target.shape}"
        )
    array[key] = values


def n_slices(volume: Volume, axis: int) -> int:
    """Number of slices along ``axis``."""
    _check_axis(axis)
    return volume.shape[axis]


def slice_centre_ras(volume: Volume, axis: int, index: int) -> np.ndarray:
    """World RAS ``(3,)`` of the centre of slice ``index`` along numpy ``axis``."""
    _check_axis(axis)
    centre_kji = (np.array(volume.shape, float) - 1) / 2
    centre_kji[axis] = index
    return volume.ijk_to_ras_points(centre_kji[::-1])[0]


def encoding_order(n_slices: int, centre: int) -> list[int]:
    """Slice indices nearest ``centre`` first (centre, +1, -1, +2, -2, ...): the order in
    which to encode slices ahead of the user's clicks. ``centre`` is clipped to the range."""
    if n_slices <= 0:
        return []
    centre = int(np.clip(centre, 0, n_slices - 1))
    order = [centre]
    for step in range(1, n_slices):
        order += [i for i in (centre + step, centre - step) if 0 <= i < n_slices]
    return order


def ras_to_slice_points(
    volume: Volume, axis: int, points_ras: np.ndarray, kind: str = "point"
) -> tuple[np.ndarray, np.ndarray]:
    """Map ``Nx3`` RAS points to slices along ``axis``.

    Returns ``(slice_indices, xy)``: ``N`` ints (the through-plane index,
    rounded) and ``Nx2`` float ``(x, y)`` slice pixels (the in-plane position,
    clipped to the slice). A point more than half a voxel outside the volume
    raises InputError naming it (``kind`` words the message, e.g. "negative point").
    """
    _check_axis(axis)
    points = np.asarray(points_ras, dtype=np.float64).reshape(-1, 3)
    kji = volume.ras_to_ijk_points(points)[:, ::-1]
    upper = np.array(volume.shape) - 1
    for n, (position, ras) in enumerate(zip(kji, points, strict=True)):
        if ((position < -HALF_VOXEL) | (position > upper + HALF_VOXEL)).any():
            ijk = ", ".join(map(_coordinate, position[::-1]))
            raise InputError(
                f"{kind} {n + 1} at RAS ({', '.join(map(_coordinate, ras))}) lies outside "
                f"volume '{volume.name}' (IJK {ijk}; size {'x'.join(map(str, volume.shape[::-1]))}"
                " voxels): place it inside the volume"
            )
    kji = np.clip(kji, 0, upper)
    indices = np.floor(kji[:, axis] + 0.5).astype(np.int64)
    xy = kji[:, list(_IN_PLANE[axis])]
    return indices, xy


def _coordinate(value: float) -> str:
    """A coordinate for a message: one decimal, or 3 significant digits when huge."""
    return f"{value:.1f}" if abs(value) < 1e9 else f"{value:.3g}"


def ijk_box_roi(volume: Volume, low_ijk, high_ijk) -> Roi:
    """The ROI between two ``(i, j, k)`` corners (continuous voxel coordinates), along
    the volume's own axes: the box a user would draw around those voxels."""
    low, high = np.asarray(low_ijk, float), np.asarray(high_ijk, float)
    center = volume.ijk_to_ras_points([(low + high) / 2])[0]
    axes = volume.ijk_to_ras[:3, :3] / volume.spacing
    return Roi(center, np.abs(high - low) * volume.spacing, axes)


def slice_box_roi(volume: Volume, axis: int, index: int, box: np.ndarray) -> Roi:
    """The one-slice ROI of ``box`` ``(x0, y0, x1, y1)`` (inclusive slice pixels) on
    slice ``index`` along ``axis``: what a user drawing that box there would save."""
    _check_axis(axis)
    low, high = np.zeros(3), np.zeros(3)  # K, J, I voxel-edge coordinates
    low[axis], high[axis] = index - HALF_VOXEL, index + HALF_VOXEL
    x_axis, y_axis = _IN_PLANE[axis]
    low[x_axis], high[x_axis] = box[0] - HALF_VOXEL, box[2] + HALF_VOXEL
    low[y_axis], high[y_axis] = box[1] - HALF_VOXEL, box[3] + HALF_VOXEL
    return ijk_box_roi(volume, low[::-1], high[::-1])


def roi_on_slice(volume: Volume, axis: int, roi: Roi, index: int) -> Roi:
    """``roi`` flattened onto slice ``index`` along ``axis``: the box of its 8 corners
    with their ``axis`` coordinate set to ``index`` (zero thickness; a flat ROI). What the
    panel's one-slice request sends the server for the ROI (``server_work._pinned_ijk``)."""
    _check_axis(axis)
    ijk = volume.ras_to_ijk_points(roi.corners_ras())
    ijk[:, 2 - axis] = index
    return ijk_box_roi(volume, ijk.min(axis=0), ijk.max(axis=0))


def slice_point_ras(volume: Volume, axis: int, index: int, xy) -> np.ndarray:
    """RAS ``(3,)`` of slice pixel ``xy`` = ``(x, y)`` on slice ``index`` along ``axis``:
    where a user clicking that pixel there puts the point (inverse of
    :func:`ras_to_slice_points`)."""
    _check_axis(axis)
    kji = np.zeros(3)
    kji[axis] = index
    x_axis, y_axis = _IN_PLANE[axis]
    kji[x_axis], kji[y_axis] = float(xy[0]), float(xy[1])
    return volume.ijk_to_ras_points(kji[::-1])[0]


def roi_to_slice_box(volume: Volume, axis: int, roi: Roi) -> tuple[tuple[int, int], np.ndarray]:
    """Project an ROI onto slices along ``axis``.

    Returns ``((first, last), box)``: the inclusive range of slice indices the
    ROI spans (at least the nearest slice, for a flat ROI) and ``box`` =
    ``(x0, y0, x1, y1)`` float slice pixels, the bounding box of its corners
    clipped to the slice. Raises InputError when the ROI misses the volume.
    """
    _check_axis(axis)
    kji = volume.ras_to_ijk_points(roi.corners_ras())[:, ::-1]
    low, high = kji.min(axis=0), kji.max(axis=0)
    upper = np.array(volume.shape) - 1
    if ((high < -HALF_VOXEL) | (low > upper + HALF_VOXEL)).any():
        raise InputError(
            f"the ROI (centre RAS {np.round(roi.center_ras, 1).tolist()}, size "
            f"{np.round(roi.size, 1).tolist()} mm) does not overlap volume '{volume.name}'"
        )
    _check_not_flat(volume, axis, roi, low, high)
    low, high = np.clip(low, 0, upper), np.clip(high, 0, upper)
    first = int(np.floor(low[axis] + 0.5))
    last = int(np.floor(high[axis] + 0.5))
    x_axis, y_axis = _IN_PLANE[axis]
    box = np.array([low[x_axis], low[y_axis], high[x_axis], high[y_axis]], dtype=np.float32)
    return (first, last), box


FLAT_IN_PLANE = 1e-6  # voxels: an ROI side this short in the slice plane is none (float noise)


def _check_not_flat(volume: Volume, axis: int, roi: Roi, low: np.ndarray, high: np.ndarray) -> None:
    """InputError when the ROI has no width or no height on the slices along ``axis``
    (``low``, ``high``: its KJI voxel extent, before clipping to the volume), e.g. a box
    drawn on a sagittal slice used on axial ones: the model would get an empty box and
    give an empty mask. A box that has both but lies past an edge of the volume by less
    than half a voxel (clipped, it is flat) is told so, not sent to another axis."""
    upper = np.array(volume.shape) - 1
    extent = np.clip(high, 0, upper) - np.clip(low, 0, upper)

    def flat(a: int) -> bool:
        return bool(extent[list(_IN_PLANE[a])].min() <= FLAT_IN_PLANE)

    if not flat(axis):
        return
    names = {index: name for name, index in anatomical_axes(volume).items()}
    centre, size = np.round(roi.center_ras, 1).tolist(), np.round(roi.size, 1).tolist()
    where = f"the ROI (centre RAS {centre}, size {size} mm)"
    for d in _IN_PLANE[axis]:
        side = _side_outside(low[d], high[d], upper[d])
        if side is not None:
            raise InputError(
                f"{where} lies outside volume '{volume.name}', past its {side} {names[d]} "
                "slice by less than half a voxel, so it holds no voxel there: move it "
                "into the volume"
            )
    working = [names[a] for a in (0, 1, 2) if not flat(a)]
    advice = (
        f"drawn on {_article(working[0])} {working[0]} slice? use --axis {working[0]}"
        if working
        else "give it a width and a height"
    )
    raise InputError(
        f"{where} has no width or no height on the {names[axis]} slices of volume "
        f"'{volume.name}': {advice}"
    )


def _side_outside(low: float, high: float, upper: float) -> str | None:
    """``first`` / ``last`` when an extent ``low..high`` (voxels along one axis of
    ``0..upper``) that is not flat itself lies before index 0 / after ``upper``; else None."""
    if high - low <= FLAT_IN_PLANE:
        return None
    if high <= FLAT_IN_PLANE:
        return "first"
    if low >= upper - FLAT_IN_PLANE:
        return "last"
    return None


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


FLAT_ROI_SLICES = 2.0  # an ROI at most this thick (in slices) is a 2D box on its slice


def roi_thickness(volume: Volume, axis: int, roi: Roi) -> float:
    """How many slices along ``axis`` the ROI spans (continuous, corner to corner)."""
    _check_axis(axis)
    kji = volume.ras_to_ijk_points(roi.corners_ras())[:, ::-1]
    return float(np.round(kji[:, axis].max() - kji[:, axis].min(), 6))


def roi_voxels(volume: Volume, roi: Roi) -> np.ndarray:
    """``(K, J, I)`` bool: the voxels whose centres lie inside the ROI (on its faces too)."""
    inside = np.zeros(volume.shape, bool)
    low, block = _roi_block(volume, roi)
    inside[tuple(slice(a, a + n) for a, n in zip(low, block.shape, strict=True))] = block
    return inside


def _roi_block(volume: Volume, roi: Roi) -> tuple[np.ndarray, np.ndarray]:
    """``(low, block)``: the KJI corner of the ROI's voxel bounding box and its voxels
    there, ``block`` bool of the box's shape (empty when the ROI misses the volume)."""
    kji = volume.ras_to_ijk_points(roi.corners_ras())[:, ::-1]
    shape = np.array(volume.shape)  # clipped before the cast: a huge ROI overflows int
    low = np.clip(np.floor(kji.min(axis=0)), 0, shape).astype(int)
    high = np.clip(np.ceil(kji.max(axis=0)) + 1, 0, shape).astype(int)
    block = np.zeros(np.maximum(high - low, 0), bool)
    if (high <= low).any():
        return low, block
    rows, cols = np.meshgrid(np.arange(low[1], high[1]), np.arange(low[2], high[2]), indexing="ij")
    half = np.asarray(roi.size, float) / 2 + 1e-6
    for k in range(low[0], high[0]):  # slice by slice: a large ROI stays small in memory
        ijk = np.stack([cols.ravel(), rows.ravel(), np.full(cols.size, k)], axis=1)
        local = (volume.ijk_to_ras_points(ijk) - roi.center_ras) @ np.asarray(roi.axes_ras)
        block[k - low[0]] = (np.abs(local) <= half).all(axis=1).reshape(rows.shape)
    return low, block


class RoiSlices:
    """``np.moveaxis(roi_voxels(volume, roi), axis, 0)`` without the whole volume: only
    the ROI's bounding box is stored, and ``self[index]`` makes slice ``index``
    ``(rows, cols)`` bool on demand. ``shape``: ``(n_slices, rows, cols)``."""

    def __init__(self, volume: Volume, roi: Roi, axis: int) -> None:
        _check_axis(axis)
        self.axis = axis
        self.low, self.block = _roi_block(volume, roi)
        shape = volume.shape
        self.shape = (shape[axis], *(shape[a] for a in range(3) if a != axis))

    def __getitem__(self, index: int) -> np.ndarray:
        plane = np.zeros(self.shape[1:], bool)
        offset = int(index) - int(self.low[self.axis])
        if 0 <= offset < self.block.shape[self.axis]:
            others = [a for a in range(3) if a != self.axis]
            region = tuple(slice(self.low[a], self.low[a] + self.block.shape[a]) for a in others)
            plane[region] = np.take(self.block, offset, axis=self.axis)
        return plane


def prompts_for_slice(
    volume: Volume,
    axis: int,
    positive: np.ndarray | None = None,
    negative: np.ndarray | None = None,
    roi: Roi | None = None,
    box_slice: int | None = None,
) -> dict[int, SlicePrompt]:
    """Group RAS prompts into one :class:`SlicePrompt` per slice along ``axis``.

    positive / negative: ``Nx3`` RAS points (labels 1 / 0); each lands on its
    nearest slice. roi: a box; it goes to ``box_slice`` (default: the slice of
    the ROI centre) and to every slice with points that the ROI spans.
    Returns ``{slice_index: SlicePrompt}`` sorted by index.
    """
    groups: dict[int, tuple[list, list]] = {}
    for points, label, kind in ((positive, 1, "positive point"), (negative, 0, "negative point")):
        if points is None or len(points) == 0:
            continue
        indices, xy = ras_to_slice_points(volume, axis, points, kind)
        for index, position in zip(indices.tolist(), xy, strict=True):
            coords, labels = groups.setdefault(index, ([], []))
            coords.append(position)
            labels.append(label)
    boxes: dict[int, np.ndarray] = {}
    if roi is not None:
        (first, last), box = roi_to_slice_box(volume, axis, roi)
        central = box_slice if box_slice is not None else _centre_slice(volume, axis, roi)
        if not first <= central <= last:
            raise InputError(
                f"slice {central} is outside the ROI, which spans slices {first}..{last}"
            )
        boxes = {index: box for index in {central, *groups} if first <= index <= last}
    if not boxes and (positive is None or len(positive) == 0):
        raise InputError("no prompt: give at least one positive point or a box (ROI)")
    prompts = {}
    for index in sorted({*groups, *boxes}):
        coords, labels = groups.get(index, ([], []))
        prompts[index] = SlicePrompt(
            points=np.array(coords, np.float32).reshape(-1, 2), labels=labels, box=boxes.get(index)
        )
    return prompts


def _centre_slice(volume: Volume, axis: int, roi: Roi) -> int:
    kji = volume.ras_to_ijk_points(roi.center_ras)[0, ::-1]
    return int(np.clip(np.floor(kji[axis] + 0.5), 0, volume.shape[axis] - 1))


def _check_axis(axis: int) -> None:
    if axis not in (0, 1, 2):
        raise InputError(f"slice axis must be 0 (K), 1 (J) or 2 (I), not {axis!r}")


def _slicer(array: np.ndarray, axis: int, index: int) -> tuple:
    """The index tuple selecting slice ``index`` along ``axis`` of a 3D array."""
    _check_axis(axis)
    if array.ndim != 3:
        raise InputError(f"a 3D (K, J, I) array is needed, not shape {array.shape}")
    if not 0 <= index < array.shape[axis]:
        raise InputError(f"slice {index} is outside 0..{array.shape[axis] - 1} along axis {axis}")
    key: list[slice | int] = [slice(None)] * 3
    key[axis] = int(index)
    return tuple(key)
