"""RobustMedSAM scripted module: MRML nodes <-> RobustMedSAMLib.

The Logic holds no algorithm. It turns a volume node into a library ``Volume``
(KJI array + IJK->RAS in world RAS), markups nodes into ``VolumePrompts`` (world
RAS), runs ``segment_volume`` and writes the 3D mask into a segment, honouring
the Segment Editor's masking choices, with one-step undo.

Frames: every array is KJI on the volume node's voxel grid. A *linear* parent
transform of the volume node is applied (IJK->RAS composed with the node's
transform to world), so geometry, prompts and segments all live in world RAS;
a non-linear transform must be hardened first. Segments are written through an
untransformed labelmap with that world geometry, so the segmentation node must
not be under a transform itself.

There is no Widget yet: use the Logic from the Python console or from
``batch_segment.py``. Nothing here imports qt, ctk or needs ``slicer.app``.
"""

from __future__ import annotations

import logging
import os
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleLogic


def _library_on_path() -> None:
    """In a source checkout the library sits beside this folder, not beside this file."""
    here = Path(__file__).resolve().parent
    for folder in (here, here.parent):
        if (folder / "RobustMedSAMLib" / "__init__.py").is_file():
            if str(folder) not in sys.path:
                sys.path.append(str(folder))
            return


_library_on_path()

from RobustMedSAMLib.atomic_files import atomic_output, full_suffix  # noqa: E402
from RobustMedSAMLib.errors import InputError  # noqa: E402
from RobustMedSAMLib.markups import Roi  # noqa: E402
from RobustMedSAMLib.volume import Volume  # noqa: E402

if TYPE_CHECKING:  # torch-heavy modules are imported when a session starts
    from RobustMedSAMLib.segment import SegmentOptions, SliceScore, VolumePrompts
    from RobustMedSAMLib.session import SegmentationSession

log = logging.getLogger(__name__)

DEFAULT_SEGMENT_NAME = "RobustMedSAM"


class RobustMedSAM(ScriptedLoadableModule):
    """Module metadata (Slicer's scripted-module convention)."""

    def __init__(self, parent) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "RobustMedSAM"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["RobustMedSAM contributors"]
        self.parent.helpText = (
            "Interactive 3D segmentation with a Segment Anything model whose image encoder "
            "comes from MedSAM and whose mask decoder comes from RobustSAM (robust to noise, "
            "blur and other degradations). Place include/exclude points or an ROI, segment one "
            "slice and propagate into 3D. Use the module logic from the Python console "
            "(<code>RobustMedSAMLogic</code>) or run <code>batch_segment.py</code> headless."
        )
        self.parent.acknowledgementText = (
            "Builds on Segment Anything (Meta AI), MedSAM (Ma et al., Nature Communications "
            "2024) and RobustSAM (Chen et al., CVPR 2024). Uses 3D Slicer's segmentation "
            "infrastructure."
        )


@dataclass
class _Snapshot:
    """What one write changed: each segment's previous mask (KJI bool on the volume grid,
    None for a segment the write created) and the world geometry it lies on."""

    segments: dict[str, np.ndarray | None]
    shape: tuple[int, int, int]
    ijk_to_ras: np.ndarray


class RobustMedSAMLogic(ScriptedLoadableModuleLogic):
    """MRML <-> library conversions and segment writing; no GUI, no algorithm.

    State: the volume node of each session it started (weakly held) and, per
    segmentation node ID, a stack of undo snapshots.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._volume_nodes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._undo: dict[str, list[_Snapshot]] = {}

    # --- MRML -> library -------------------------------------------------------------

    def volume_from_node(self, volume_node) -> Volume:
        """The node's voxels (KJI copy) and IJK->world RAS (linear parent transform applied).

        Raises InputError for a missing or non-scalar volume and for a non-linear
        parent transform (harden it first).
        """
        if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
            raise InputError("select a scalar volume node to segment")
        image = volume_node.GetImageData()
        if image is None or image.GetPointData().GetScalars() is None:
            raise InputError(f"volume '{volume_node.GetName()}' holds no image data")
        if image.GetNumberOfScalarComponents() != 1:
            raise InputError(
                f"volume '{volume_node.GetName()}' is not a scalar (grey-level) volume"
            )
        matrix = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(matrix)
        ijk_to_ras = _to_world(volume_node) @ _numpy_matrix(matrix)
        array = np.array(slicer.util.arrayFromVolume(volume_node), copy=True)
        return Volume(array, ijk_to_ras, volume_node.GetName())

    def prompts_from_nodes(
        self, positive_points_node=None, negative_points_node=None, roi_node=None
    ) -> VolumePrompts:
        """``VolumePrompts`` in world RAS: the defined control points of the point lists
        (``Nx3``) and the ROI's centre, size (mm) and axes. Any node may be None."""
        from RobustMedSAMLib.segment import VolumePrompts

        return VolumePrompts(
            positive=_defined_points_world(positive_points_node),
            negative=_defined_points_world(negative_points_node),
            roi=None if roi_node is None else _roi_world(roi_node),
        )

    def start_session(
        self,
        volume_node,
        model_name: str = "demo",
        checkpoint: str | os.PathLike | None = None,
        device: str = "auto",
        axis: str | int = "axial",
        predictor=None,
        encoder: str | os.PathLike | None = None,
        decoder: str | os.PathLike | None = None,
    ) -> SegmentationSession:
        """A segmentation session on the node's volume.

        Loads ``model_name`` (see ``robustmedsam models``) unless ``predictor`` is given
        (anything behind the Predictor interface, e.g. a test double). ``axis`` is
        ``axial``, ``coronal``, ``sagittal`` or an array axis 0..2 (KJI).
        """
        from RobustMedSAMLib.session import SegmentationSession

        volume = self.volume_from_node(volume_node)
        model_id = model_name
        if predictor is None:
            from RobustMedSAMLib.loader import load_named_model

            loaded = load_named_model(model_name, checkpoint, encoder, decoder, device)
            predictor = loaded.predictor()
            model_id = f"{model_name}:{sorted(str(p) for p in loaded.checkpoints.values())}"
        session = SegmentationSession(volume, predictor, axis, model_id=model_id)
        self._volume_nodes[session] = volume_node
        return session

    # --- library -> MRML -------------------------------------------------------------

    def segment(
        self,
        session: SegmentationSession,
        prompts: VolumePrompts,
        options: SegmentOptions | None,
        segmentation_node,
        segment_id: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        overwrite_other_segments: bool = False,
        editable_mask: np.ndarray | None = None,
        segment_name: str | None = None,
    ) -> list[SliceScore]:
        """Segment from ``prompts`` and write the 3D mask into ``segment_id``.

        The segment is created (named ``segment_name``) when ``segment_id`` is None or
        absent. See :meth:`write_mask` for the masking rules. Returns the per-slice
        scores. On cancel (CancelledError) or a bad prompt (InputError) nothing is
        written.
        """
        from RobustMedSAMLib.segment import segment_volume

        volume_node = self._volume_nodes.get(session)
        if volume_node is None:
            raise InputError("this session was not started by this logic: use start_session")
        result = segment_volume(session, prompts, options, progress, cancel)
        self.write_mask(
            segmentation_node,
            volume_node,
            result.mask,
            segment_id,
            overwrite_other_segments,
            editable_mask,
            segment_name,
            reference=session.volume,
        )
        return result.slices

    def write_mask(
        self,
        segmentation_node,
        volume_node,
        mask: np.ndarray,
        segment_id: str | None = None,
        overwrite_other_segments: bool = False,
        editable_mask: np.ndarray | None = None,
        segment_name: str | None = None,
        reference: Volume | None = None,
    ) -> str:
        """Replace the segment's voxels with ``mask`` (KJI bool on the volume grid).

        editable_mask (KJI bool): only these voxels may change; the segment keeps its
        previous voxels elsewhere. overwrite_other_segments: True removes the new
        voxels from every other segment; False keeps other segments' voxels out of
        the new mask. The previous state is kept for :meth:`undo_last`. Returns the
        segment ID (created when needed).
        """
        volume = reference or self.volume_from_node(volume_node)
        new = _checked_mask(mask, volume.shape, "mask")
        _prepare_segmentation(segmentation_node, volume_node)
        segmentation = segmentation_node.GetSegmentation()
        with _grid_labelmap(volume.shape, volume.ijk_to_ras) as grid:
            segment_id, created = _ensure_segment(segmentation_node, segment_id, segment_name)
            previous = (
                np.zeros(volume.shape, bool)
                if created
                else _read(grid, segmentation_node, segment_id)
            )
            if editable_mask is not None:
                editable = _checked_mask(editable_mask, volume.shape, "editable_mask")
                new = np.where(editable, new, previous)
            others = {
                other: _read(grid, segmentation_node, other)
                for other in segmentation.GetSegmentIDs()
                if other != segment_id
            }
            changed: dict[str, np.ndarray | None] = {segment_id: None if created else previous}
            for other, other_mask in others.items():
                if not overwrite_other_segments:
                    new &= ~other_mask
                elif (other_mask & new).any():
                    changed[other] = other_mask.copy()
                    _write(grid, segmentation_node, other, other_mask & ~new)
            _write(grid, segmentation_node, segment_id, new)
        snapshot = _Snapshot(changed, volume.shape, volume.ijk_to_ras.copy())
        self._undo.setdefault(segmentation_node.GetID(), []).append(snapshot)
        return segment_id

    def can_undo(self, segmentation_node) -> bool:
        return bool(self._undo.get(segmentation_node.GetID()))

    def undo_last(self, segmentation_node) -> bool:
        """Restore the segments the last write changed (removing one it created).
        Returns False when there is nothing to undo."""
        stack = self._undo.get(segmentation_node.GetID())
        if not stack:
            return False
        snapshot = stack.pop()
        segmentation = segmentation_node.GetSegmentation()
        with _grid_labelmap(snapshot.shape, snapshot.ijk_to_ras) as grid:
            for segment_id, previous in snapshot.segments.items():
                if previous is None:
                    segmentation.RemoveSegment(segment_id)
                elif segmentation.GetSegment(segment_id) is not None:
                    _write(grid, segmentation_node, segment_id, previous)
        return True

    def save_segmentation(self, segmentation_node, path: str | os.PathLike) -> Path:
        """Write the segmentation as ``.seg.nrrd`` (atomically) with Slicer's storage node."""
        path = Path(path)
        if full_suffix(path) != ".seg.nrrd":
            raise InputError(f"save a segmentation as .seg.nrrd, not {path.name}")
        storage = slicer.vtkMRMLSegmentationStorageNode()
        with atomic_output(path) as temporary:
            storage.SetFileName(str(temporary))
            if not storage.WriteData(segmentation_node) or not temporary.stat().st_size:
                raise InputError(f"could not write segmentation to {path}")
        return path


# --- helpers ----------------------------------------------------------------------------


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


def _write(grid, segmentation_node, segment_id: str, mask: np.ndarray) -> None:
    """Replace the segment's voxels by ``mask`` (KJI bool on ``grid``)."""
    if not mask.any():
        _segments_logic().ClearSegment(segmentation_node, segment_id)
        return
    slicer.util.updateVolumeFromArray(grid, mask.astype(np.uint8))
    if not _segments_logic().ImportLabelmapToSegmentationNode(
        grid, segmentation_node, _ids(segment_id)
    ):
        raise InputError(f"could not write segment '{segment_id}'")
