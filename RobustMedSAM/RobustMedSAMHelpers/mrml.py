"""MRML helpers of the RobustMedSAM module: nodes <-> numpy, and segment writing.

Pure functions on MRML nodes, no Qt and no model: the geometry of volumes, markups and
ROIs in world RAS, the Segment Editor's editable area, and reading / writing a segment
on a box of the volume grid the way Slicer's segmentation logic does (see
docs/slicer.md, *Segment writing, checked against Slicer's source*). Arrays are KJI on
the volume's voxel grid; a box is a tuple of three slices of that grid.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import slicer
import vtk

from RobustMedSAMLib.errors import InputError
from RobustMedSAMLib.formats.markups import Roi
from RobustMedSAMLib.formats.volume import Volume

DEFAULT_SEGMENT_NAME = "RobustMedSAM"


def _numpy_matrix(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _to_world(node) -> np.ndarray:
    """4x4 from the node's coordinates to world RAS (identity without a parent transform)."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise InputError(
            f"'{node.GetName()}' is under the non-linear transform '{parent.GetName()}': "
            "harden it first (Data module, right-click the node, Harden transform)"
        )
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return _numpy_matrix(matrix)


def _defined_points_world(node) -> np.ndarray | None:
    """``Nx3`` world RAS of the node's placed control points (None for no node/points)."""
    if node is None:
        return None
    defined = slicer.vtkMRMLMarkupsNode.PositionDefined
    points = []
    for index in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(index) == defined:
            position = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(index, position)
            points.append(position)
    return np.array(points, dtype=np.float64).reshape(-1, 3) if points else None


def _roi_world(roi_node) -> Roi:
    """The ROI's centre, edge lengths (mm) and unit axes, all in world RAS."""
    if not roi_node.IsA("vtkMRMLMarkupsROINode"):
        raise InputError(f"'{roi_node.GetName()}' is not an ROI node")
    if roi_node.GetNumberOfDefinedControlPoints() < 1:
        raise InputError(f"ROI '{roi_node.GetName()}' is not placed yet")
    center, size = [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    roi_node.GetCenterWorld(center)
    roi_node.GetSizeWorld(size)
    axes = np.zeros((3, 3))
    for column, getter in enumerate(
        (roi_node.GetXAxisWorld, roi_node.GetYAxisWorld, roi_node.GetZAxisWorld)
    ):
        axis = [0.0, 0.0, 0.0]
        getter(axis)
        axes[:, column] = np.asarray(axis) / np.linalg.norm(axis)
    return Roi(np.array(center), np.array(size), axes)


def _prepare_segmentation(segmentation_node, volume_node) -> None:
    """Refuse a transformed segmentation node; give a new one the volume's geometry."""
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise InputError("select a segmentation node to write into")
    parent = segmentation_node.GetParentTransformNode()
    if parent is not None:
        raise InputError(
            f"segmentation '{segmentation_node.GetName()}' is under transform "
            f"'{parent.GetName()}': harden or remove it, segments are written in world RAS"
        )
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    if segmentation_node.GetNodeReference(role) is None:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()


def _checked_mask(mask: np.ndarray, shape: tuple[int, int, int], what: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise InputError(f"{what} has shape {mask.shape}; the volume grid is {tuple(shape)} (KJI)")
    return mask.astype(bool, copy=True)


def _ensure_segment(
    segmentation_node, segment_id: str | None, name: str | None
) -> tuple[str, bool]:
    """The segment's ID and whether it was created now."""
    segmentation = segmentation_node.GetSegmentation()
    if segment_id and segmentation.GetSegment(segment_id) is not None:
        return segment_id, False
    created = segmentation.AddEmptySegment(
        segment_id or "", name or segment_id or DEFAULT_SEGMENT_NAME
    )
    if not created or segmentation.GetSegment(created) is None:
        raise InputError(
            f"could not add a segment to '{segmentation_node.GetName()}' "
            "(its segmentation converters are not registered)"
        )
    return created, True


@contextmanager
def _grid_labelmap(shape: tuple[int, int, int], ijk_to_ras: np.ndarray) -> Iterator:
    """A temporary, untransformed labelmap node: ``shape`` (KJI) voxels, IJK->world RAS."""
    scene = slicer.mrmlScene
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__RobustMedSAM_grid__")
    try:
        node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras))
        slicer.util.updateVolumeFromArray(node, np.zeros(shape, np.uint8))
        yield node
    finally:
        display = node.GetDisplayNode()
        if display is not None and display.GetColorNode() is not None:
            color = display.GetColorNode()
            if color.GetName().startswith("__RobustMedSAM"):
                scene.RemoveNode(color)
        scene.RemoveNode(node)


def _vtk_matrix(matrix: np.ndarray):
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(matrix[r, c]))
    return out


def _segments_logic():
    return slicer.modules.segmentations.logic()


def _segment_editor_node():
    """The Segment Editor module's parameter node (its singleton, never another module's
    private editor node), or None before the Segment Editor was ever opened."""
    return slicer.mrmlScene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")


def _visible_segments(segmentation_node) -> list[str]:
    display = segmentation_node.GetDisplayNode()
    ids = segmentation_node.GetSegmentation().GetSegmentIDs()
    return [i for i in ids if display is None or display.GetSegmentVisibility(i)]


def _edit_mask(
    segmentation_node, volume: Volume, box: tuple[slice, ...], mode: int, edited: str, editor
) -> np.ndarray:
    """Slicer's editable area (``GenerateEditMask``) as KJI bool on ``box`` of the grid."""
    from vtk.util.numpy_support import vtk_to_numpy

    shape = _box_shape(volume.shape, box)
    reference = _oriented_box(volume, box, np.zeros(shape, bool))
    blocked = slicer.vtkOrientedImageData()
    ok = segmentation_node.GenerateEditMask(
        blocked,
        mode,
        reference,
        edited,
        editor.GetMaskSegmentID() or "",
        None,
        None,
        segmentation_node.GetDisplayNode(),
    )
    scalars = blocked.GetPointData().GetScalars()
    if not ok or scalars is None or blocked.GetExtent() != reference.GetExtent():
        raise InputError(
            "could not compute the Segment Editor's editable area; check its masking "
            "settings (the mask segment must exist in this segmentation)"
        )
    return vtk_to_numpy(scalars).reshape(shape) == 0  # non-zero: not editable


def _source_array(editor_node, volume: Volume) -> np.ndarray:
    """The Segment Editor's source volume (KJI) where its intensity range applies; this
    volume when the editor has none. InputError when it lies on another grid."""
    source = editor_node.GetSourceVolumeNode()
    if source is None:
        return volume.array
    matrix = vtk.vtkMatrix4x4()
    source.GetIJKToRASMatrix(matrix)
    array = slicer.util.arrayFromVolume(source)
    same = array.shape == volume.shape and np.allclose(
        _to_world(source) @ _numpy_matrix(matrix), volume.ijk_to_ras, atol=1e-4
    )
    if not same:
        raise InputError(
            f"the Segment Editor's source volume '{source.GetName()}' is not on the grid of "
            f"'{volume.name}': choose that volume as its source, or turn off its "
            "editable intensity range"
        )
    return array


LABELMAP = "Binary labelmap"  # vtkSegmentationConverter's binary labelmap representation


def slice_box(shape: tuple[int, int, int], axis: int, index: int) -> tuple[slice, slice, slice]:
    """The KJI slices selecting slice ``index`` along numpy ``axis`` of a grid."""
    box = [slice(None)] * 3
    box[axis] = slice(int(index), int(index) + 1)
    return tuple(box)  # type: ignore[return-value]


def _box_bounds(shape: tuple[int, int, int], box: tuple[slice, ...]) -> list[tuple[int, int]]:
    """``[(start, stop)]`` per KJI axis of ``box`` on a grid of ``shape``."""
    return [b.indices(n)[:2] for b, n in zip(box, shape, strict=True)]


def _box_shape(shape: tuple[int, int, int], box: tuple[slice, ...]) -> tuple[int, int, int]:
    return tuple(stop - start for start, stop in _box_bounds(shape, box))  # type: ignore[return-value]


def _crop_editable(editable, shape: tuple[int, int, int], box) -> np.ndarray | None:
    """An editable mask given on the whole grid or on ``box`` only, as ``box``'s shape."""
    if editable is None:
        return None
    editable = np.asarray(editable, dtype=bool)
    if editable.shape == tuple(shape):
        return editable[box]
    return _checked_mask(editable, _box_shape(shape, box), "editable_mask")


def _oriented_box(volume: Volume, box: tuple[slice, ...], values: np.ndarray):
    """A ``vtkOrientedImageData`` (uint8 0/1) holding ``values`` (KJI) at ``box`` of the
    volume grid: its IJK are the volume's, its image-to-world the volume's IJK->RAS."""
    from vtk.util.numpy_support import vtk_to_numpy

    (k0, k1), (j0, j1), (i0, i1) = _box_bounds(volume.shape, box)
    image = slicer.vtkOrientedImageData()
    image.SetExtent(i0, i1 - 1, j0, j1 - 1, k0, k1 - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    vtk_to_numpy(image.GetPointData().GetScalars())[:] = np.asarray(values, np.uint8).ravel()
    image.SetImageToWorldMatrix(_vtk_matrix(volume.ijk_to_ras))
    return image


def _layer_view(segment, volume: Volume, box) -> tuple[np.ndarray, tuple] | None:
    """``(view, where)``: the part of the segment's internal labelmap (its layer, shared
    with other segments, KJI; writable, as ``slicer.util.arrayFromSegmentInternalBinaryLabelmap``)
    inside ``box``, and where that part lies in an array of ``box``'s shape. None when the
    layer is not on the volume's lattice; ``(empty, ())`` when it misses the box."""
    from vtk.util.numpy_support import vtk_to_numpy

    empty = np.zeros((0, 0, 0), np.uint8), ()
    image = segment.GetRepresentation(LABELMAP)
    if image is None:
        return None  # another source representation (closed surface)
    if image.GetPointData().GetScalars() is None:
        return empty
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    if not np.allclose(_numpy_matrix(matrix), volume.ijk_to_ras, atol=1e-4):
        return None
    i0, i1, j0, j1, k0, k1 = image.GetExtent()
    wanted = _box_bounds(volume.shape, box)
    lows, highs = (k0, j0, i0), (k1 + 1, j1 + 1, i1 + 1)
    lo = [max(w[0], low) for w, low in zip(wanted, lows, strict=True)]
    hi = [min(w[1], high) for w, high in zip(wanted, highs, strict=True)]
    if any(a >= b for a, b in zip(lo, hi, strict=True)):
        return empty
    layer = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(
        k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1
    )
    where = tuple(slice(a - w[0], b - w[0]) for a, b, w in zip(lo, hi, wanted, strict=True))
    view = layer[tuple(slice(a - low, b - low) for a, b, low in zip(lo, hi, lows, strict=True))]
    return view, where


def _read_box(segmentation_node, segment_id: str, volume: Volume, box) -> np.ndarray:
    """The segment inside ``box`` of the volume grid as KJI bool (``box``'s shape).

    Reads the segment's own labelmap directly when it lies on the volume's lattice (the
    usual case, cost proportional to the box); otherwise exports it through Slicer."""
    out = np.zeros(_box_shape(volume.shape, box), bool)
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        return out
    found = _layer_view(segment, volume, box)
    if found is None:
        labelmaps = segmentation_node.GetSegmentation().GetSourceRepresentationName() == LABELMAP
        if labelmaps and segment.GetRepresentation(LABELMAP) is None:
            return out  # a segment added empty
        return _read_exported(segmentation_node, segment_id, volume, box)
    view, where = found
    if where:
        out[where] = view == segment.GetLabelValue()
    return out


def _erase_box(segmentation_node, segment_id: str, volume: Volume, box, before, erase) -> None:
    """Remove ``erase`` (KJI bool, ``box``'s shape) from the segment: in place in its
    internal labelmap (Slicer's documented way: edit the array, then ``Modified()``),
    cost proportional to the box; through ``_set_box`` when not on the volume lattice."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    found = _layer_view(segment, volume, box)
    if found is None:
        _set_box(segmentation_node, segment_id, volume, box, before & ~erase)
        return
    view, where = found
    if not where:
        return
    hit = (view == segment.GetLabelValue()) & erase[where]
    if hit.any():
        view[hit] = 0
        segment.GetRepresentation(LABELMAP).Modified()
        segment.Modified()


def _own_layer(segmentation_node, segment_id: str) -> None:
    """Move the segment out of a shared layer (Slicer's ``SeparateSegmentLabelmap``), so
    that writing it costs in proportion to its own extent, not to the layer's."""
    segmentation = segmentation_node.GetSegmentation()
    if len(segmentation.GetSegmentIDsForLayer(segmentation.GetLayerIndex(segment_id))) > 1:
        segmentation.SeparateSegmentLabelmap(segment_id)


def _read_exported(segmentation_node, segment_id: str, volume: Volume, box) -> np.ndarray:
    """The segment on ``box`` through ``ExportSegmentsToLabelmapNode`` (any lattice or
    source representation; slower)."""
    (k0, _), (j0, _), (i0, _) = _box_bounds(volume.shape, box)
    shift = np.eye(4)
    shift[:3, 3] = (i0, j0, k0)
    with _grid_labelmap(_box_shape(volume.shape, box), volume.ijk_to_ras @ shift) as grid:
        return _read(grid, segmentation_node, segment_id)


def _set_box(segmentation_node, segment_id: str, volume: Volume, box, values: np.ndarray) -> None:
    """Make the segment equal ``values`` (KJI bool) inside ``box``, unchanged elsewhere,
    with ``SetBinaryLabelmapToSegment`` restricted to the box: a minimum clears the
    segment where ``values`` is 0, a mask merge sets it where 1. No other segment loses
    voxels; Slicer moves the segment to its own layer where it would overlap one."""
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    image = _oriented_box(volume, box, values)
    extent = image.GetExtent()
    everyone = list(segmentation_node.GetSegmentation().GetSegmentIDs())  # MIN spares them
    ok = logic.SetBinaryLabelmapToSegment(
        image, segmentation_node, segment_id, logic.MODE_MERGE_MIN, extent, False, everyone
    )
    if values.any():
        ok = ok and logic.SetBinaryLabelmapToSegment(
            image, segmentation_node, segment_id, logic.MODE_MERGE_MASK, extent, False, []
        )
    if not ok:
        raise InputError(f"could not write segment '{segment_id}'")


def _overwritten(segmentation_node, segment_id: str, overwrite) -> tuple[str, ...]:
    """The other segments whose voxels a write takes: all (True), none (False), or the
    given IDs that exist."""
    others = [i for i in segmentation_node.GetSegmentation().GetSegmentIDs() if i != segment_id]
    if isinstance(overwrite, bool):
        return tuple(others) if overwrite else ()
    return tuple(i for i in others if i in overwrite)


def _ids(segment_id: str):
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    return ids


def _read(grid, segmentation_node, segment_id: str) -> np.ndarray:
    """The segment as KJI bool on ``grid``'s geometry."""
    shape = tuple(reversed(grid.GetImageData().GetDimensions()))
    out = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__RobustMedSAM_read__")
    try:
        ok = _segments_logic().ExportSegmentsToLabelmapNode(
            segmentation_node, _ids(segment_id), out, grid
        )
        image = out.GetImageData()
        if not ok or image is None or image.GetPointData().GetScalars() is None:
            return np.zeros(shape, bool)  # an empty segment exports nothing
        array = slicer.util.arrayFromVolume(out) > 0
        if array.shape != shape:
            raise InputError(f"segment '{segment_id}' did not export on the volume grid")
        return array
    finally:
        display = out.GetDisplayNode()
        if display is not None and display.GetColorNode() is not None:
            slicer.mrmlScene.RemoveNode(display.GetColorNode())
        slicer.mrmlScene.RemoveNode(out)


def display_window(volume_node) -> tuple[float, float] | None:
    """``(low, high)`` of the window/level the node is displayed with; None when it has
    no scalar display node or a zero width."""
    display = volume_node.GetDisplayNode()
    if display is None or not hasattr(display, "GetWindow"):
        return None
    width, level = float(display.GetWindow()), float(display.GetLevel())
    if not width > 0:
        return None
    return level - width / 2, level + width / 2
