"""The RobustMedSAM module's Logic: ``RobustMedSAMLogic`` (no GUI, no algorithm), its
parameter node, the choices the panel shows, and ``shared_logic()`` (the one Logic the
panel and the Segment Editor effect share). ``RobustMedSAM.py`` re-exports them.

The Logic turns a volume node into a library ``Volume`` (KJI array + IJK->RAS in world
RAS), markups nodes into ``VolumePrompts`` (world RAS), runs the library and writes
3D masks into a segment, honouring the Segment Editor's masking choices, with undo.
Heavy work is split in two: ``compute*`` methods touch no MRML node and may run in a
worker thread; ``write*`` methods update MRML and run on the main thread.

Frames: every array is KJI on the volume node's voxel grid. A *linear* parent
transform of the volume node is applied (IJK->RAS composed with the node's
transform to world), so geometry, prompts and segments all live in world RAS;
a non-linear transform must be hardened first. Segments are written through an
untransformed labelmap with that world geometry, so the segmentation node must
not be under a transform itself.

Importing this file needs neither torch nor Qt: the Logic works in slicer-core
(headless tests) and in ``Slicer --no-main-window``; the Widget needs Slicer's GUI.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import slicer
import vtk
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModuleLogic,
)

from RobustMedSAMHelpers.mrml import (
    _box_shape,
    _checked_mask,
    _crop_editable,
    _defined_points_world,
    _edit_mask,
    _ensure_segment,
    _erase_box,
    _numpy_matrix,
    _overwritten,
    _own_layer,
    _prepare_segmentation,
    _read_box,
    _roi_world,
    _set_box,
    _source_array,
    _to_world,
    _visible_segments,
    display_window,
    slice_box,
)
from RobustMedSAMLib.errors import CancelledError, InputError
from RobustMedSAMLib.formats.atomic import atomic_output, full_suffix
from RobustMedSAMLib.formats.volume import Volume
from RobustMedSAMLib.inference.slicing import encoding_order
from RobustMedSAMLib.inference.types import SliceResult
from RobustMedSAMLib.names import (
    AXIS_NAMES,
    CORRUPTION_NAMES,
    DEFAULT_BOX_EXTENSION,
    DEFAULT_LIKENESS,
    DEFAULT_MODEL,
    DEFAULT_STABILITY,
    DEVICES,
    MODEL_NAMES,
    OVERLAP_MEASURES,
    PROJECTIONS,
    SEED_BOX_GROWTH,
)

if TYPE_CHECKING:  # torch-heavy modules are imported when a session starts
    from RobustMedSAMLib.evaluation.robustness_preview import PreviewComparison
    from RobustMedSAMLib.inference.segment_volume import (
        SegmentationResult,
        SegmentOptions,
        SliceScore,
        VolumePrompts,
    )
    from RobustMedSAMLib.inference.session import SegmentationSession

log = logging.getLogger("RobustMedSAM")  # the module file's logger, as before the split

PREVIEW_SEGMENTATION_NAME = "RobustMedSAM corruption preview"

# Choices shown in the panel, from the library's stdlib-only vocabularies (importing
# this file loads neither torch nor Pillow).
AXES = ("view", *AXIS_NAMES)  # "view": the slice view the point is in
OVERLAPS = OVERLAP_MEASURES
FINETUNE_SOURCES = ("scene", "medsegbench")
ORIENTATION_AXES = {"Axial": "axial", "Coronal": "coronal", "Sagittal": "sagittal"}


@parameterNodeWrapper
class RobustMedSAMParameterNode:
    """The panel's state, saved with the scene.

    input_volume: the volume to segment; segmentation / segment_id: where masks go;
    positive_points / negative_points: include / exclude points; roi: an optional box;
    model_name, checkpoint_path (a file overriding the model's default), device;
    axis: slicing axis ("view" = the orientation of the view a point is placed in);
    auto_update, overwrite_other_segments, use_editor_masking: how results are written;
    projection ... slice_step: propagation options (see ``PropagationOptions``;
    seed_box_growth: a drawn box's growth before the first ask, ``SegmentOptions``);
    flag_score / flag_overlap: a slice is flagged unsure under either; corruption /
    severity / corruption_seed: the preview; finetune_source, finetune_data_folder,
    finetune_config, finetune_output: fine-tuning.
    """

    input_volume: slicer.vtkMRMLScalarVolumeNode
    segmentation: slicer.vtkMRMLSegmentationNode
    segment_id: str = ""
    positive_points: slicer.vtkMRMLMarkupsFiducialNode
    negative_points: slicer.vtkMRMLMarkupsFiducialNode
    roi: slicer.vtkMRMLMarkupsROINode
    model_name: Annotated[str, Choice(MODEL_NAMES)] = DEFAULT_MODEL
    checkpoint_path: str = ""
    device: Annotated[str, Choice(DEVICES)] = "auto"
    axis: Annotated[str, Choice(AXES)] = "view"
    auto_update: bool = True
    overwrite_other_segments: bool = False
    use_editor_masking: bool = True
    projection: Annotated[str, Choice(PROJECTIONS)] = "mask"
    overlap_measure: Annotated[str, Choice(OVERLAPS)] = "containment"
    stop_iou: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    min_score: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    min_area_ratio: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    min_likeness: Annotated[float, WithinRange(0.0, 1.0)] = DEFAULT_LIKENESS
    min_stability: Annotated[float, WithinRange(0.0, 1.0)] = DEFAULT_STABILITY
    seed_box_growth: Annotated[float, WithinRange(0.0, 1.0)] = SEED_BOX_GROWTH
    box_extension: Annotated[float, WithinRange(0.0, 1.0)] = DEFAULT_BOX_EXTENSION
    stop_between_seeds: bool = False
    zoom_to_box: bool = False
    slice_step: Annotated[int, WithinRange(1, 5)] = 1
    flag_score: Annotated[float, WithinRange(0.0, 1.0)] = 0.7
    flag_overlap: Annotated[float, WithinRange(0.0, 1.0)] = 0.85
    corruption: Annotated[str, Choice(CORRUPTION_NAMES)] = "gaussian_noise"
    severity: Annotated[int, WithinRange(1, 5)] = 3
    corruption_seed: Annotated[int, WithinRange(0, 1_000_000)] = 0
    finetune_source: Annotated[str, Choice(FINETUNE_SOURCES)] = "scene"
    finetune_data_folder: str = ""
    finetune_config: str = ""
    finetune_output: str = ""


@dataclass
class _Snapshot:
    """What one write changed, on the changed box only: each segment's previous voxels
    (KJI bool array of the box's shape; None for a segment the write created), the box
    (KJI slices of the volume grid) and the grid's IJK->world RAS."""

    segments: dict[str, np.ndarray | None]
    box: tuple[slice, slice, slice]
    shape: tuple[int, int, int]
    ijk_to_ras: np.ndarray

    @property
    def nbytes(self) -> int:
        return sum(0 if m is None else m.nbytes for m in self.segments.values())


@dataclass(frozen=True)
class EditorMasking:
    """The Segment Editor's masking choices as :meth:`RobustMedSAMLogic.write_mask`
    arguments: ``editable_mask`` (KJI bool on ``box`` of the volume grid, the whole grid
    when ``box`` is None; None = editable everywhere) and ``overwrite_other_segments``
    (True: all, False: none, i.e. Slicer's "Allow overlap", or the IDs of the segments
    the new voxels are taken from, e.g. the visible ones)."""

    editable_mask: np.ndarray | None
    overwrite_other_segments: bool | frozenset[str]
    box: tuple[slice, slice, slice] | None = None


class RobustMedSAMLogic(ScriptedLoadableModuleLogic):
    """MRML <-> library conversions and segment writing; no GUI, no algorithm.

    State: the volume node of each session it started (weakly held) and, per
    segmentation node (the object: MRML reuses IDs after a scene clear), a stack of
    undo snapshots cropped to what each write changed, capped at ``UNDO_STEPS`` writes
    and ``UNDO_BYTES`` bytes, and dropped when the node is removed or the scene closes.
    """

    UNDO_STEPS = 10
    UNDO_BYTES = 256 * 2**20

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._volume_nodes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._undo: dict[Any, list[_Snapshot]] = {}
        self._observed_scene = None
        self._scene_observers: list[int] = []

    def getParameterNode(self) -> RobustMedSAMParameterNode:
        """The module's typed parameter node (Slicer's convention; needs the app)."""
        return RobustMedSAMParameterNode(super().getParameterNode())

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
        from RobustMedSAMLib.inference.segment_volume import VolumePrompts

        return VolumePrompts(
            positive=_defined_points_world(positive_points_node),
            negative=_defined_points_world(negative_points_node),
            roi=None if roi_node is None else _roi_world(roi_node),
        )

    def load_model(
        self,
        model_name: str = DEFAULT_MODEL,
        checkpoint: str | os.PathLike | None = None,
        device: str = "auto",
        encoder: str | os.PathLike | None = None,
        decoder: str | os.PathLike | None = None,
    ) -> tuple[Any, str]:
        """``(predictor, model_id)`` for ``model_name`` (see ``robustmedsam models``).

        Touches no MRML node: the panel calls it in a worker thread. An empty
        ``checkpoint`` means the model's default file.
        """
        from RobustMedSAMLib.inference.loader import load_named_model

        loaded = load_named_model(model_name, checkpoint or None, encoder, decoder, device)
        model_id = f"{model_name}:{sorted(str(p) for p in loaded.checkpoints.values())}"
        return loaded.predictor(), model_id

    def start_session(
        self,
        volume_node,
        model_name: str = DEFAULT_MODEL,
        checkpoint: str | os.PathLike | None = None,
        device: str = "auto",
        axis: str | int = "axial",
        predictor=None,
        encoder: str | os.PathLike | None = None,
        decoder: str | os.PathLike | None = None,
        model_id: str | None = None,
        window: tuple[float, float] | None = None,
    ) -> SegmentationSession:
        """A segmentation session on the node's volume.

        Loads ``model_name`` (see ``robustmedsam models``) unless ``predictor`` is given
        (one from :meth:`load_model`, or anything behind the Predictor interface, e.g. a
        test double). ``axis`` is ``axial``, ``coronal``, ``sagittal`` or an array axis
        0..2 (KJI). ``window``: ``(low, high)``, a preset name or ``"LO,HI"``; default:
        the node's display window (the user segments what they see), else from the volume.
        """
        from RobustMedSAMLib.inference.session import SegmentationSession

        volume = self.volume_from_node(volume_node)
        if predictor is None:
            predictor, model_id = self.load_model(model_name, checkpoint, device, encoder, decoder)
        shown = display_window(volume_node) if window is None else None
        session = SegmentationSession(
            volume, predictor, axis, window=shown or window, model_id=model_id or model_name
        )
        if shown is not None:
            session.window_source = "display"
        self._volume_nodes[session] = volume_node
        return session

    def volume_node_of(self, session: SegmentationSession):
        """The volume node ``session`` was started on (InputError for a foreign session)."""
        volume_node = self._volume_nodes.get(session)
        if volume_node is None:
            raise InputError("this session was not started by this logic: use start_session")
        return volume_node

    # --- library work (no MRML: safe in a worker thread) -----------------------------

    encoding_order = staticmethod(encoding_order)  # RobustMedSAMLib.inference.slicing

    def encode_ahead(
        self,
        session: SegmentationSession,
        centre: int,
        progress: Callable[[int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> list[int]:
        """Encode slices nearest ``centre`` first, as many as the session's memory cache
        holds (measured on the first slice), so later clicks cost only the decoder.
        Returns the indices encoded; CancelledError when ``cancel()`` turns True."""
        order = self.encoding_order(session.n_slices, centre)
        if not order:
            return []
        if cancel is not None and cancel():
            raise CancelledError("encoding cancelled")
        first = session.encoded(order[0])
        per_slice = max(1, int(first.features.nbytes))
        order = order[: max(1, min(len(order), session.cache_bytes // per_slice))]
        if progress is not None:
            progress(1, len(order))
        session.encode_slices(
            order[1:],
            None if progress is None else lambda done, _total: progress(done + 1, len(order)),
            cancel,
        )
        return order

    def compute(
        self,
        session: SegmentationSession,
        prompts: VolumePrompts,
        options: SegmentOptions | None = None,
        progress: Callable[[int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> SegmentationResult:
        """Segment from ``prompts`` (``segment_volume``) without writing anything."""
        from RobustMedSAMLib.inference.segment_volume import segment_volume

        return segment_volume(session, prompts, options, progress, cancel)

    def slice_of_point(self, session: SegmentationSession, point_ras) -> int:
        """The slice (along the session's axis) holding a world RAS point; InputError
        when the point lies outside the volume."""
        from RobustMedSAMLib.inference.slicing import ras_to_slice_points

        indices, _ = ras_to_slice_points(session.volume, session.axis, np.asarray(point_ras))
        return int(indices[0])

    def compute_slice(
        self,
        session: SegmentationSession,
        prompts: VolumePrompts,
        index: int,
        options: SegmentOptions | None = None,
    ) -> SliceResult:
        """Segment slice ``index`` from the points on it and the ROI (when it spans the
        slice; flattened onto it, as the panel sends it); points on other slices are
        ignored. The server's one-slice segment request: ``segment_volume`` with
        ``options`` (default ``SegmentOptions()``) and propagation off, so points alone
        go through the point search, a drawn box is grown and a small one zoomed, and a
        request adding points to the slice's last one (a correction click) keeps the box
        the search found and feeds the last mask back (docs/slicer.md, "Correction
        clicks"). ``mask``: KJI bool, only slice ``index`` set. InputError when nothing
        prompts it."""
        from RobustMedSAMLib.inference.segment_volume import (
            SegmentOptions,
            VolumePrompts,
            segment_volume,
        )
        from RobustMedSAMLib.inference.slicing import (
            get_slice,
            roi_on_slice,
            roi_to_slice_box,
            set_slice,
        )

        volume, axis = session.volume, session.axis
        roi = prompts.roi
        if roi is not None:
            (first, last), _ = roi_to_slice_box(volume, axis, roi)
            roi = roi_on_slice(volume, axis, roi, index) if first <= index <= last else None
        positive = self._points_on_slice(session, prompts.positive, index)
        if positive is None and roi is None:
            raise InputError(f"slice {index} has no include point and no ROI: add one there")
        negative = self._points_on_slice(session, prompts.negative, index)
        one_slice = replace(options or SegmentOptions(), propagate=False)
        result = segment_volume(session, VolumePrompts(positive, negative, roi), one_slice)
        mask = np.zeros(volume.shape, dtype=bool)
        set_slice(mask, axis, index, get_slice(result.mask, axis, index))
        scores = [s.score for s in result.slices if s.index == index]
        return SliceResult(index, axis, mask, float(scores[0]) if scores else float("nan"))

    def _points_on_slice(
        self, session: SegmentationSession, points: np.ndarray | None, index: int
    ) -> np.ndarray | None:
        if points is None or len(points) == 0:
            return None
        from RobustMedSAMLib.inference.slicing import ras_to_slice_points

        indices, _ = ras_to_slice_points(session.volume, session.axis, points)
        kept = np.asarray(points)[indices == index]
        return kept if len(kept) else None

    def preview_session(self, session: SegmentationSession, corrupted_node) -> SegmentationSession:
        """A session on ``corrupted_node`` sharing ``session``'s model, axis and window
        (so only the corruption differs between the two)."""
        return self.start_session(
            corrupted_node,
            predictor=session.predictor,
            axis=session.axis,
            model_id=f"{session.model_id}:preview",
            window=session.window,
        )

    def compare(
        self,
        clean: SegmentationSession,
        corrupted: SegmentationSession,
        prompts: VolumePrompts,
        options: SegmentOptions | None = None,
        progress: Callable[[int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> PreviewComparison:
        """The same prompts on the clean and the corrupted session, and the Dice
        (``RobustMedSAMLib.evaluation.robustness_preview.compare``)."""
        from RobustMedSAMLib.evaluation.robustness_preview import compare

        return compare(clean, corrupted, prompts, options, progress, cancel)

    @staticmethod
    def corrupted_array(volume: Volume, name: str, severity: int, seed: int = 0) -> np.ndarray:
        """``volume.array`` (KJI) degraded by corruption ``name`` at ``severity`` 1..5."""
        from RobustMedSAMLib.evaluation.robustness_preview import corrupted_array

        return corrupted_array(volume, name, severity, seed)

    # --- library -> MRML (main thread) -----------------------------------------------

    def segment(
        self,
        session: SegmentationSession,
        prompts: VolumePrompts,
        options: SegmentOptions | None,
        segmentation_node,
        segment_id: str | None = None,
        progress: Callable[[int, int], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        overwrite_other_segments: bool | frozenset[str] = False,
        editable_mask: np.ndarray | None = None,
        segment_name: str | None = None,
    ) -> list[SliceScore]:
        """Segment from ``prompts`` and write the 3D mask into ``segment_id``.

        The segment is created (named ``segment_name``) when ``segment_id`` is None or
        absent. See :meth:`write_mask` for the masking rules. Returns the per-slice
        scores. On cancel (CancelledError) or a bad prompt (InputError) nothing is
        written.
        """
        volume_node = self.volume_node_of(session)
        result = self.compute(session, prompts, options, progress, cancel)
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

    def segment_slice(
        self,
        session: SegmentationSession,
        prompts: VolumePrompts,
        index: int,
        segmentation_node,
        segment_id: str | None = None,
        overwrite_other_segments: bool | frozenset[str] = False,
        editable_mask: np.ndarray | None = None,
        segment_name: str | None = None,
        options: SegmentOptions | None = None,
    ) -> str:
        """Segment slice ``index`` from the prompts on it (:meth:`compute_slice`) and write
        that slice only (the rest of the segment is kept). One undo step. Returns the
        segment ID."""
        result = self.compute_slice(session, prompts, index, options)
        return self.write_slice(
            session,
            result,
            segmentation_node,
            segment_id,
            overwrite_other_segments,
            editable_mask,
            segment_name,
        )

    def write_slice(
        self,
        session: SegmentationSession,
        result: SliceResult,
        segmentation_node,
        segment_id: str | None = None,
        overwrite_other_segments: bool | frozenset[str] = False,
        editable_mask: np.ndarray | None = None,
        segment_name: str | None = None,
    ) -> str:
        """Write a :class:`SliceResult` into its slice of the segment (other slices kept).

        Only that slice is read and written, whatever the number of other segments.
        ``editable_mask``: KJI bool on the whole grid or on the slice (shape with 1 along
        the axis), e.g. :meth:`editor_masking` with ``box=slice_box(...)``."""
        shape = session.volume.shape
        box = slice_box(shape, result.axis, result.index)
        return self._write_box(
            segmentation_node,
            self.volume_node_of(session),
            session.volume,
            box,
            _checked_mask(result.mask, shape, "mask")[box],
            segment_id,
            overwrite_other_segments,
            _crop_editable(editable_mask, shape, box),
            segment_name,
        )

    def write_mask(
        self,
        segmentation_node,
        volume_node,
        mask: np.ndarray,
        segment_id: str | None = None,
        overwrite_other_segments: bool | frozenset[str] = False,
        editable_mask: np.ndarray | None = None,
        segment_name: str | None = None,
        reference: Volume | None = None,
    ) -> str:
        """Replace the segment's voxels with ``mask`` (KJI bool on the volume grid).

        Slicer's Segment Editor semantics ("Set" of ``vtkSlicerSegmentEditorLogic::
        ModifySegmentByLabelmap``): editable_mask (KJI bool) limits the change, the
        segment keeps its previous voxels elsewhere; overwrite_other_segments True
        removes the written voxels from every other segment, a set of segment IDs from
        those only, False leaves other segments untouched (overlap allowed). The
        previous state of what changed is kept for :meth:`undo_last`. Returns the
        segment ID (created when needed).
        """
        volume = reference or self.volume_from_node(volume_node)
        box = (slice(None),) * 3
        return self._write_box(
            segmentation_node,
            volume_node,
            volume,
            box,
            _checked_mask(mask, volume.shape, "mask"),
            segment_id,
            overwrite_other_segments,
            _crop_editable(editable_mask, volume.shape, box),
            segment_name,
        )

    def write_extent(
        self,
        segmentation_node,
        volume_node,
        extent: tuple[slice, slice, slice],
        block: np.ndarray,
        segment_id: str | None = None,
        overwrite_other_segments: bool | frozenset[str] = False,
        editable_mask: np.ndarray | None = None,
        segment_name: str | None = None,
    ) -> str:
        """Set the segment to ``block`` (KJI bool, ``extent``'s shape) inside ``extent``
        (3 KJI slices of the volume grid), e.g. a :meth:`request_propagate` answer; the
        rest of the segment is kept. Masking and undo as :meth:`write_mask`;
        ``editable_mask`` on the whole grid or on the extent. Returns the segment ID."""
        from RobustMedSAMHelpers.server_work import volume_arrays

        array, ijk_to_ras = volume_arrays(volume_node)  # a view: only the geometry is used
        volume = Volume(array, ijk_to_ras, volume_node.GetName())
        extent = tuple(extent)
        return self._write_box(
            segmentation_node,
            volume_node,
            volume,
            extent,
            _checked_mask(block, _box_shape(volume.shape, extent), "mask"),
            segment_id,
            overwrite_other_segments,
            _crop_editable(editable_mask, volume.shape, extent),
            segment_name,
        )

    def _write_box(
        self,
        segmentation_node,
        volume_node,
        volume: Volume,
        box: tuple[slice, slice, slice],
        new: np.ndarray,
        segment_id: str | None,
        overwrite: bool | frozenset[str],
        editable: np.ndarray | None,
        segment_name: str | None,
    ) -> str:
        """Set the segment to ``new`` (KJI bool, ``box``'s shape) inside ``box`` of the
        volume grid through ``vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment``
        restricted to the box; other segments are read and changed only where they
        overlap the written voxels."""
        _prepare_segmentation(segmentation_node, volume_node)
        segment_id, created = _ensure_segment(segmentation_node, segment_id, segment_name)
        previous = _read_box(segmentation_node, segment_id, volume, box)
        if editable is not None:
            new = np.where(editable, new, previous)
        written = new if editable is None else new & editable
        changed: dict[str, np.ndarray | None] = {segment_id: None if created else previous}
        for other in _overwritten(segmentation_node, segment_id, overwrite):
            before = _read_box(segmentation_node, other, volume, box)
            if (before & written).any():
                changed[other] = before
                _erase_box(segmentation_node, other, volume, box, before, written)
        _own_layer(segmentation_node, segment_id)
        _set_box(segmentation_node, segment_id, volume, box, new)
        snapshot = _Snapshot(changed, box, volume.shape, volume.ijk_to_ras.copy())
        self._remember(segmentation_node, snapshot)
        return segment_id

    def _remember(self, segmentation_node, snapshot: _Snapshot) -> None:
        """Push an undo step; drop the oldest beyond the caps."""
        self._observe_scene()
        stack = self._undo.setdefault(segmentation_node, [])
        stack.append(snapshot)
        while len(stack) > 1 and (
            len(stack) > self.UNDO_STEPS or sum(s.nbytes for s in stack) > self.UNDO_BYTES
        ):
            stack.pop(0)

    def _observe_scene(self) -> None:
        """Forget undo steps of removed nodes and of a closed scene (IDs are reused)."""
        scene = slicer.mrmlScene
        if scene is self._observed_scene:
            return
        self.forget_undo()
        if self._observed_scene is not None:
            for tag in self._scene_observers:
                self._observed_scene.RemoveObserver(tag)
        self._observed_scene = scene
        me = weakref.ref(self)  # the scene must not keep the logic alive

        def on_close(*_args) -> None:
            if (logic := me()) is not None:
                logic.forget_undo()

        def on_removed(*_args) -> None:
            if (logic := me()) is not None:
                logic._prune_undo()

        self._scene_observers = [
            scene.AddObserver(scene.StartCloseEvent, on_close),
            scene.AddObserver(scene.NodeRemovedEvent, on_removed),
        ]

    def forget_undo(self) -> None:
        """Drop every undo step (a scene closes)."""
        self._undo.clear()

    def _prune_undo(self) -> None:
        scene = self._observed_scene
        for node in [n for n in self._undo if scene is None or not scene.IsNodePresent(n)]:
            del self._undo[node]

    def editor_masking(
        self,
        editor_node,
        segmentation_node,
        volume_node,
        segment_id: str | None = None,
        box: tuple[slice, slice, slice] | None = None,
    ) -> EditorMasking:
        """The masking a Segment Editor effect would apply, from a ``vtkMRMLSegmentEditorNode``:
        its editable area (everywhere, inside/outside all or visible segments, inside one
        segment; computed by Slicer's own ``GenerateEditMask``, the edited segment always
        editable), its editable intensity range on the editor's source volume (this
        volume when it has none; it must lie on the same grid) and its overwrite mode
        (all, visible or no other segments: Slicer's "Allow overlap"). ``box``: compute
        on that part of the grid only (e.g. :func:`slice_box`), None for all of it."""
        volume = self.volume_from_node(volume_node)
        region = box or (slice(None),) * 3
        mode = editor_node.GetMaskMode()
        editable = None
        if mode != slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere:
            editable = _edit_mask(
                segmentation_node, volume, region, mode, segment_id or "", editor_node
            )
        if editor_node.GetSourceVolumeIntensityMask():
            low, high = editor_node.GetSourceVolumeIntensityMaskRange()
            source = _source_array(editor_node, volume)[region]
            in_range = (source >= low) & (source <= high)
            editable = in_range if editable is None else editable & in_range
        overwrite = editor_node.GetOverwriteMode()
        if overwrite == slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments:
            return EditorMasking(editable, True, box)
        if overwrite == slicer.vtkMRMLSegmentEditorNode.OverwriteNone:
            return EditorMasking(editable, False, box)
        visible = frozenset(_visible_segments(segmentation_node))
        return EditorMasking(editable, visible, box)

    def segment_mask(self, segmentation_node, segment_id: str, volume_node) -> np.ndarray:
        """The segment as ``(K, J, I)`` bool on the volume node's grid (world geometry)."""
        volume = self.volume_from_node(volume_node)
        if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise InputError(f"'{segmentation_node.GetName()}' has no segment '{segment_id}'")
        return _read_box(segmentation_node, segment_id, volume, (slice(None),) * 3)

    def can_undo(self, segmentation_node) -> bool:
        self._prune_undo()
        return bool(self._undo.get(segmentation_node))

    def undo_last(self, segmentation_node) -> bool:
        """Restore what the last write changed (removing a segment it created), on the
        changed box only. Returns False when there is nothing to undo."""
        if not self.can_undo(segmentation_node):
            return False
        snapshot = self._undo[segmentation_node].pop()
        segmentation = segmentation_node.GetSegmentation()
        grid = Volume(np.zeros(snapshot.shape, np.uint8), snapshot.ijk_to_ras)
        for segment_id, previous in snapshot.segments.items():  # clear first: no overlap clash
            if previous is None:
                segmentation.RemoveSegment(segment_id)
            elif segmentation.GetSegment(segment_id) is not None:
                _set_box(segmentation_node, segment_id, grid, snapshot.box, previous)
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

    def add_volume_like(self, volume_node, array: np.ndarray, name: str):
        """A new scalar volume node holding ``array`` (KJI, the node's shape) on
        ``volume_node``'s grid: same IJK->RAS, same parent transform."""
        reference = self.volume_from_node(volume_node)
        if np.shape(array) != reference.shape:
            raise InputError(f"array has shape {np.shape(array)}; the volume is {reference.shape}")
        node = slicer.util.addVolumeFromArray(np.ascontiguousarray(array), name=name)
        matrix = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(matrix)
        node.SetIJKToRASMatrix(matrix)
        node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        return node

    def corrupted_copy(self, volume_node, name: str, severity: int, seed: int = 0, array=None):
        """A new volume node: a corrupted copy of ``volume_node`` (the original is left
        untouched), named ``<volume> <corruption> s<severity>``. ``array``: the corrupted
        voxels when already computed (the panel computes them in the background)."""
        if array is None:
            array = self.corrupted_array(self.volume_from_node(volume_node), name, severity, seed)
        return self.add_volume_like(
            volume_node, array, f"{volume_node.GetName()} {name} s{int(severity)}"
        )

    def write_preview(self, clean, corrupted, comparison: PreviewComparison) -> tuple[Any, Any]:
        """Write the two preview masks, each into its own segmentation node (reused when
        present) so that each slice view can show one: ``... (clean)`` on the clean
        volume's grid, ``... (corrupted)`` on the copy's. ``clean``/``corrupted``: the
        volume nodes (or in-process sessions on them). Returns the two nodes."""
        nodes = []
        for label, session, mask, color in (
            ("clean", clean, comparison.clean_mask, (0.0, 0.86, 1.0)),
            ("corrupted", corrupted, comparison.corrupted_mask, (1.0, 0.82, 0.0)),
        ):
            name = f"{PREVIEW_SEGMENTATION_NAME} ({label})"
            node = slicer.mrmlScene.GetFirstNodeByName(name)
            if node is None or not node.IsA("vtkMRMLSegmentationNode"):
                node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            existing = node.GetSegmentation().GetSegmentIdBySegmentName(label)
            in_process = session in self._volume_nodes
            segment_id = self.write_mask(
                node,
                self.volume_node_of(session) if in_process else session,
                mask,
                existing or None,
                True,
                segment_name=label,
                reference=session.volume if in_process else None,
            )
            node.GetSegmentation().GetSegment(segment_id).SetColor(*color)
            nodes.append(node)
        return nodes[0], nodes[1]

    # --- fine-tuning -----------------------------------------------------------------

    def training_pairs_in_scene(self) -> list[tuple[Any, Any, str]]:
        """``(volume node, segmentation node, segment ID)`` for every non-empty segment
        whose segmentation references a scalar volume (its source / geometry volume)."""
        pairs = []
        role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
        for index in range(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
            node = slicer.mrmlScene.GetNthNodeByClass(index, "vtkMRMLSegmentationNode")
            if node.GetName().startswith(PREVIEW_SEGMENTATION_NAME):
                continue
            volume = node.GetNodeReference(role)
            if volume is None or not volume.IsA("vtkMRMLScalarVolumeNode"):
                continue
            segmentation = node.GetSegmentation()
            for segment_id in segmentation.GetSegmentIDs():
                pairs.append((volume, node, segment_id))
        return pairs

    def export_training_pair(
        self,
        volume_node,
        segmentation_node,
        segment_id: str,
        folder: str | os.PathLike,
        name: str | None = None,
        overwrite: bool = False,
    ) -> tuple[Path, Path]:
        """Write the volume and the segment (a 0/1 label map on its grid) as an
        image/label pair for fine-tuning. Returns ``(image_path, label_path)``."""
        from RobustMedSAMLib.training.export import export_training_pair, safe_name

        volume = self.volume_from_node(volume_node)
        labels = self.segment_mask(segmentation_node, segment_id, volume_node).astype(np.uint8)
        if not labels.any():
            raise InputError(f"segment '{segment_id}' is empty: nothing to train on")
        segment_name = segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()
        stem = name or safe_name(f"{volume_node.GetName()}_{segment_name}")
        return export_training_pair(volume, labels, Path(folder), stem, overwrite=overwrite)

    def export_scene_training_data(
        self, folder: str | os.PathLike, overwrite: bool = False
    ) -> list[tuple[Path, Path]]:
        """Export every non-empty segment in the scene (see :meth:`training_pairs_in_scene`).
        InputError when there is none."""
        written = []
        for volume_node, segmentation_node, segment_id in self.training_pairs_in_scene():
            try:
                written.append(
                    self.export_training_pair(
                        volume_node, segmentation_node, segment_id, folder, overwrite=overwrite
                    )
                )
            except InputError as error:
                log.info("not exported: %s", error)
        if not written:
            raise InputError(
                "no segmentation in the scene has a non-empty segment on a volume: "
                "segment some structures first, or choose a MedSegBench folder"
            )
        return written

    @staticmethod
    def write_finetune_config(
        path: str | os.PathLike,
        data_folder: str | os.PathLike,
        base: str | os.PathLike | None = None,
        steps: int | None = None,
    ) -> Path:
        """A fine-tuning config (TOML) at ``path`` reading ``data_folder`` (``base``: a
        config whose other settings are kept)."""
        from RobustMedSAMLib.training.export import write_finetune_config

        return write_finetune_config(
            Path(path),
            data_folder=Path(data_folder),
            base=Path(base) if base else None,
            steps=steps,
        )

    @staticmethod
    def finetune_python() -> str:
        """The Python that runs ``robustmedsam finetune``: Slicer's ``PythonSlicer`` (the
        application binary is not a Python interpreter), else this interpreter."""
        executable = Path(sys.executable)
        names = ("PythonSlicer.exe", "PythonSlicer") if os.name == "nt" else ("PythonSlicer",)
        for name in names:
            beside = executable.with_name(name)
            if beside.is_file():
                return str(beside)
        return shutil.which("PythonSlicer") or sys.executable

    def start_finetune(
        self, config: str | os.PathLike, out_dir: str | os.PathLike, resume: bool = False
    ):
        """Launch fine-tuning as a subprocess (``FinetuneProcess``); returns it started."""
        from RobustMedSAMLib.training.process import FinetuneProcess

        process = FinetuneProcess(
            Path(config), Path(out_dir), python=self.finetune_python(), resume=resume
        )
        process.start()
        return process

    # --- model work through the inference server (main thread, event-driven) ----------

    @property
    def server(self):
        """The ``ServerWork`` (RobustMedSAMHelpers/server_work.py) the requests go
        through; made on first use (it needs Qt's timers)."""
        if getattr(self, "_server", None) is None:
            import qt as qt_module

            from RobustMedSAMHelpers.server_work import ServerWork

            self._server = ServerWork(qt_module)
        return self._server

    def start_local_server(
        self,
        model_name: str = DEFAULT_MODEL,
        device: str = "auto",
        checkpoint: str | os.PathLike | None = None,
        python: str | None = None,
    ) -> None:
        """Start ``robustmedsam serve`` on 127.0.0.1 with Slicer's own Python (where the
        dependency check installs torch; :meth:`finetune_python`), the library folder
        first on its PYTHONPATH. Requests made meanwhile wait for its ready line."""
        import RobustMedSAMLib
        from RobustMedSAMHelpers.server_link import serve_arguments

        library = Path(RobustMedSAMLib.__file__).resolve().parent.parent
        arguments = serve_arguments(model_name, device, str(checkpoint) if checkpoint else None)
        self.server.use_local(python or self.finetune_python(), arguments, [str(library)])

    def use_remote_server(self, url: str, token: str, cafile: str | None = None) -> None:
        """Send the model work to the server at ``url`` (``robustmedsam serve`` elsewhere);
        Slicer's Python then needs no torch."""
        self.server.use_remote(url, token, cafile)

    def stop_server(self) -> None:
        """Stop the local server (if any) and forget the sessions (scene close, exit)."""
        if getattr(self, "_server", None) is not None:
            self._server.stop()

    def server_prompts(self, positive_points_node=None, negative_points_node=None, roi_node=None,
                       as_arrays: bool = True):  # fmt: skip
        """The prompts in world RAS without importing torch: ``(points Nx3, labels N,
        roi)`` for :meth:`request_slice` (labels 1 include, 0 exclude), or with
        ``as_arrays=False`` an object with ``positive``, ``negative`` (``Nx3`` or None)
        and ``roi`` for :meth:`request_segment`. Any node may be None."""
        from RobustMedSAMHelpers.server_work import ServerPrompts

        positive = _defined_points_world(positive_points_node)
        negative = _defined_points_world(negative_points_node)
        roi = None if roi_node is None else _roi_world(roi_node)
        if not as_arrays:
            return ServerPrompts(positive, negative, roi)
        parts = [p for p in (positive, negative) if p is not None and len(p)]
        points = np.concatenate(parts) if parts else np.zeros((0, 3))
        count = 0 if positive is None else len(positive)
        labels = np.r_[np.ones(count, int), np.zeros(len(points) - count, int)]
        return points, labels, roi

    def request_slice(
        self,
        volume_node,
        axis: str | int,
        slice_index: int,
        points_ras,
        labels,
        box_ras=None,
        on_done: Callable[[np.ndarray, dict], None] | None = None,
        on_error: Callable[[Exception], None] | None = None,
    ):
        """Segment one slice on the server; returns at once with a handle (``.cancel()``,
        ``.state``).

        ``axis``: ``axial``/``coronal``/``sagittal`` or the KJI array axis 0..2;
        ``slice_index``: the slice along it. ``points_ras``: ``Nx3`` world RAS points
        (projected onto that slice), ``labels``: ``N`` ints (1 include, 0 exclude).
        ``box_ras``: None, ``(2, 3)`` opposite RAS corners, ``{"center", "size", "axes"}``
        or a library ``Roi`` (its projection onto the slice is the box prompt). At least
        one include point or a box is needed.

        On the main thread, later: ``on_done(mask, details)`` with ``mask`` the slice's
        2D bool mask (the KJI volume with ``axis`` removed: ``(J, I)`` for axial) and
        ``details`` ``{"slice", "axis" (0..2), "score" (predicted IoU), "record"}``; or
        ``on_error(exception)`` (InputError: the prompt; ServerError: the server;
        CancelledError: after ``handle.cancel()``). Nothing is written to MRML.
        """
        return self.server.slice(
            volume_node, axis, slice_index, points_ras, labels, box_ras, on_done, on_error
        )

    def request_propagate(
        self,
        volume_node,
        axis: str | int,
        seed_index: int,
        seed_mask,
        options: dict | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        on_done: Callable[[tuple, np.ndarray, dict], None] | None = None,
        on_error: Callable[[Exception], None] | None = None,
    ):
        """Propagate a slice mask through the volume on the server; returns a handle.

        ``seed_mask``: the 2D bool mask of slice ``seed_index`` (shape as ``request_slice``
        gives it). ``options``: the protocol's propagation options (``projection``,
        ``iou_threshold``, ``min_score``, ``min_area_ratio``, ``min_likeness``,
        ``min_stability`` (0 turns a rule off), ``overlap``, ``bounds``,
        ``max_slices``, ``zoom``, ``box_extension``, ``stop_between_seeds``, ``slice_step``;
        docs/server.md). ``on_progress(done, total)`` while it runs; then
        ``on_done(extent, mask, details)``: ``extent`` a KJI tuple of 3 slices, ``mask``
        the bool array of the result there (seed slice included; outside it nothing
        was segmented), ``details`` ``{"seed", "axis", "stops", "changed_slices",
        "filled"}`` (the slice range of the changed box, the seed within it; ``filled``:
        the slices interpolated, not asked, with ``slice_step`` > 1; an older server
        sends none: []); or
        ``on_error`` as :meth:`request_slice`. ``handle.cancel()`` stops the job on the
        server (nothing is changed) and reports CancelledError.
        """
        return self.server.propagate(
            volume_node, axis, seed_index, seed_mask, options, on_progress, on_done, on_error
        )

    def request_segment(
        self,
        volume_node,
        prompts: VolumePrompts,
        propagate: bool = True,
        options: dict | None = None,
        axis: str | int = "axial",
        on_progress: Callable[[int, int], None] | None = None,
        on_done: Callable[[np.ndarray, dict], None] | None = None,
        on_error: Callable[[Exception], None] | None = None,
    ):
        """Segment from ``prompts`` (:meth:`prompts_from_nodes`, world RAS) on the server,
        as ``robustmedsam segment`` does: the prompted slices, propagated into 3D when
        ``propagate``. ``on_done(mask, record)``: ``mask`` the ``(K, J, I)`` bool result,
        ``record`` the run record (``record["slices"]``: index, score, overlap, area,
        source per slice). ``options``: those of :meth:`request_propagate` and
        ``seed_box_growth`` (a box drawn on one slice grows by this fraction per side
        before the first ask; 0: off). Returns a handle; nothing is written to MRML."""
        return self.server.segment(
            volume_node, axis, prompts, propagate, options, on_progress, on_done, on_error
        )

    def request_encode(self, volume_node, axis: str | int, centre: int, on_done=None,
                       on_error=None, slice_step: int = 1):  # fmt: skip
        """Let the server encode the slices around ``centre`` while the user looks (as
        many as its cache holds, nearest first, every ``slice_step``-th as propagation
        will ask them; any job stops it). ``on_done(queued)``."""
        return self.server.encode(volume_node, axis, centre, on_done, on_error, slice_step)

    # --- dependencies ----------------------------------------------------------------

    @staticmethod
    def dependency_plan(remote: bool = False):
        """``(requirements, plan)``: the library's checked requirements (torch and
        torchvision as minimum versions: ``dependencies.for_slicer``) and an
        ``InstallPlan`` for the missing ones (nothing is installed here). ``remote``:
        the model runs on a remote server; Slicer's Python needs only the client's
        packages (``dependencies.CLIENT_REQUIREMENTS``)."""
        from RobustMedSAMLib import dependencies

        specs = list(dependencies.CLIENT_REQUIREMENTS) if remote else dependencies.required()
        requirements = dependencies.check(dependencies.for_slicer(specs))
        return requirements, dependencies.install_plan(requirements)


_shared_logic: RobustMedSAMLogic | None = None


def shared_logic() -> RobustMedSAMLogic:
    """The one Logic the panel and the Segment Editor effect share (its model sessions,
    undo and server link)."""
    global _shared_logic
    if _shared_logic is None:
        _shared_logic = RobustMedSAMLogic()
    return _shared_logic
