"""RobustMedSAM scripted module: MRML nodes <-> RobustMedSAMLib, and the panel.

Slicer's four classes: ``RobustMedSAM`` (metadata), ``RobustMedSAMWidget`` (the panel,
built from ``Resources/UI/RobustMedSAM.ui``), ``RobustMedSAMLogic`` (no GUI, no
algorithm) and ``RobustMedSAMTest`` (an end-to-end self-test with the default model).

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

import importlib
import importlib.util
import logging
import math
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import slicer
import vtk
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

try:  # Slicer's PythonQt; absent in slicer-core (headless), where only the Logic is used
    import qt
except ImportError:
    qt = None


def _library_on_path() -> None:
    """The helper package beside this file, and the library: beside this file when
    installed, beside this folder in a source checkout. (Slicer puts a scripted
    module's folder on sys.path itself; a file loaded by path, as in the tests, not.)"""
    here = Path(__file__).resolve().parent
    if str(here) not in sys.path:
        sys.path.append(str(here))
    for folder in (here, here.parent):
        if (folder / "RobustMedSAMLib" / "__init__.py").is_file():
            if str(folder) not in sys.path:
                sys.path.append(str(folder))
            return


_library_on_path()

from RobustMedSAMHelpers.mrml import (  # noqa: E402
    DEFAULT_SEGMENT_NAME,
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
    _segment_editor_node,
    _set_box,
    _source_array,
    _to_world,
    _visible_segments,
    _vtk_matrix,
    display_window,
    slice_box,
)

from RobustMedSAMLib.errors import CancelledError, InputError  # noqa: E402
from RobustMedSAMLib.formats.atomic import atomic_output, full_suffix  # noqa: E402
from RobustMedSAMLib.formats.volume import Volume  # noqa: E402
from RobustMedSAMLib.names import (  # noqa: E402
    AXIS_NAMES,
    CORRUPTION_NAMES,
    DEFAULT_MODEL,
    DEVICES,
    MODEL_NAMES,
    OVERLAP_MEASURES,
    PROJECTIONS,
)

if TYPE_CHECKING:  # torch-heavy modules are imported when a session starts
    from RobustMedSAMLib.inference.segment_volume import (
        SegmentationResult,
        SegmentOptions,
        SliceScore,
        VolumePrompts,
    )
    from RobustMedSAMLib.inference.session import SegmentationSession

log = logging.getLogger(__name__)

UNDO_KEYS = "Ctrl+Z"
PREVIEW_SEGMENTATION_NAME = "RobustMedSAM corruption preview"

# Choices shown in the panel, from the library's stdlib-only vocabularies (importing
# this file loads neither torch nor Pillow).
AXES = ("view", *AXIS_NAMES)  # "view": the slice view the point is in
OVERLAPS = OVERLAP_MEASURES
FINETUNE_SOURCES = ("scene", "medsegbench")
ORIENTATION_AXES = {"Axial": "axial", "Coronal": "coronal", "Sagittal": "sagittal"}


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
            "blur and other degradations).<br>"
            "1. Choose a volume: its slices are encoded in the background.<br>"
            "2. Place include (green) / exclude (red) points or an ROI in any slice view: "
            "the segment updates on that slice after each point.<br>"
            "3. <b>Propagate</b> fills 3D; the table lists each slice's confidence, "
            "double-click a row to jump there. <b>Undo</b> (Ctrl+Z) restores the segment.<br>"
            "<b>Corruption preview</b> segments a degraded copy side by side and reports the "
            "Dice between the two masks. <b>Fine-tuning</b> trains the decoder on your "
            "segmentations in a separate process.<br>"
            "Scripts: <code>RobustMedSAMLogic</code> from the Python console, or "
            "<code>batch_segment.py</code> headless."
        )
        self.parent.acknowledgementText = (
            "Builds on Segment Anything (Meta AI), MedSAM (Ma et al., Nature Communications "
            "2024) and RobustSAM (Chen et al., CVPR 2024). Uses 3D Slicer's segmentation "
            "infrastructure."
        )


@parameterNodeWrapper
class RobustMedSAMParameterNode:
    """The panel's state, saved with the scene.

    input_volume: the volume to segment; segmentation / segment_id: where masks go;
    positive_points / negative_points: include / exclude points; roi: an optional box;
    model_name, checkpoint_path (a file overriding the model's default), device;
    axis: slicing axis ("view" = the orientation of the view a point is placed in);
    auto_update, overwrite_other_segments, use_editor_masking: how results are written;
    projection ... zoom_to_box: propagation options (see ``PropagationOptions``);
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
    box_extension: Annotated[float, WithinRange(0.0, 1.0)] = 0.1
    stop_between_seeds: bool = False
    zoom_to_box: bool = False
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


@dataclass
class SliceResult:
    """One slice segmented from the prompts on it.

    index: slice along ``axis`` (a numpy axis of the KJI array); mask: ``(K, J, I)``
    bool on the volume grid, set on that slice only; score: the model's predicted IoU.
    """

    index: int
    axis: int
    mask: np.ndarray
    score: float


@dataclass
class ConfidenceRow:
    """One row of the per-slice confidence table. overlap is NaN on prompted slices;
    flagged: the score or the overlap is under the user's thresholds."""

    index: int
    score: float
    overlap: float
    area: int
    source: str
    flagged: bool


@dataclass
class PreviewComparison:
    """The model's masks on the clean and the corrupted volume (``(K, J, I)`` bool on
    the same grid) and the Dice between them (1.0 = the corruption changed nothing)."""

    clean_mask: np.ndarray
    corrupted_mask: np.ndarray
    dice: float


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

    @staticmethod
    def encoding_order(n_slices: int, centre: int) -> list[int]:
        """Slice indices nearest ``centre`` first (centre, +1, -1, +2, -2, ...)."""
        if n_slices <= 0:
            return []
        centre = int(np.clip(centre, 0, n_slices - 1))
        order = [centre]
        for step in range(1, n_slices):
            order += [i for i in (centre + step, centre - step) if 0 <= i < n_slices]
        return order

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
        self, session: SegmentationSession, prompts: VolumePrompts, index: int
    ) -> SliceResult:
        """Segment slice ``index`` from the points on it (and the ROI, when it spans the
        slice); points on other slices are ignored. InputError when nothing prompts it."""
        from RobustMedSAMLib.inference.segment_volume import VolumePrompts
        from RobustMedSAMLib.inference.slicing import prompts_for_slice, roi_to_slice_box, set_slice

        volume, axis = session.volume, session.axis
        roi = prompts.roi
        if roi is not None:
            (first, last), _ = roi_to_slice_box(volume, axis, roi)
            roi = roi if first <= index <= last else None
        on_slice = VolumePrompts(
            positive=self._points_on_slice(session, prompts.positive, index),
            negative=self._points_on_slice(session, prompts.negative, index),
            roi=roi,
        )
        if on_slice.positive is None and roi is None:
            raise InputError(f"slice {index} has no include point and no ROI: add one there")
        prompt = prompts_for_slice(
            volume, axis, on_slice.positive, on_slice.negative, roi, box_slice=index
        )[index]
        prediction = session.segment_slice(index, prompt)
        mask = np.zeros(volume.shape, dtype=bool)
        set_slice(mask, axis, index, np.asarray(prediction.mask, bool))
        return SliceResult(index, axis, mask, float(prediction.score))

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
        """The same prompts on the clean and the corrupted session, and the Dice."""
        from RobustMedSAMLib.evaluation.metrics import dice

        steps = [0, 0]

        def half(part: int) -> Callable[[int, int], None] | None:
            if progress is None:
                return None

            def report(done: int, total: int) -> None:
                steps[part] = int(100 * done / max(1, total))
                progress(sum(steps), 200)

            return report

        clean_mask = self.compute(clean, prompts, options, half(0), cancel).mask
        corrupted_mask = self.compute(corrupted, prompts, options, half(1), cancel).mask
        return PreviewComparison(clean_mask, corrupted_mask, dice(clean_mask, corrupted_mask))

    @staticmethod
    def corrupted_array(volume: Volume, name: str, severity: int, seed: int = 0) -> np.ndarray:
        """``volume.array`` (KJI) degraded by corruption ``name`` at ``severity`` 1..5."""
        from RobustMedSAMLib.corruptions import corrupt

        spacing_kji = tuple(float(s) for s in volume.spacing[::-1])
        return corrupt(volume.array, name, int(severity), seed=int(seed), spacing=spacing_kji)

    @staticmethod
    def confidence_rows(
        scores: list[SliceScore], min_score: float = 0.7, min_overlap: float = 0.85
    ) -> list[ConfidenceRow]:
        """Rows for the confidence table, in slice order; a slice is flagged when its
        predicted IoU is under ``min_score`` or its overlap with the neighbour slice
        it was propagated from is under ``min_overlap``."""
        rows = []
        for s in sorted(scores, key=lambda s: s.index):
            low_overlap = not math.isnan(s.overlap) and s.overlap < min_overlap
            rows.append(
                ConfidenceRow(
                    int(s.index),
                    float(s.score),
                    float(s.overlap),
                    int(s.area),
                    s.source,
                    bool(s.score < min_score or low_overlap),
                )
            )
        return rows

    @staticmethod
    def next_unsure(rows: list[ConfidenceRow], after: int | None = None) -> int | None:
        """The first flagged slice after ``after`` (wrapping round); None if none is."""
        flagged = [r.index for r in rows if r.flagged]
        if not flagged:
            return None
        later = [i for i in flagged if after is None or i > after]
        return later[0] if later else flagged[0]

    @staticmethod
    def slice_centre_ras(session: SegmentationSession, index: int) -> np.ndarray:
        """World RAS ``(3,)`` of the centre of slice ``index`` along the session's axis."""
        centre_kji = (np.array(session.volume.shape, float) - 1) / 2
        centre_kji[session.axis] = index
        return session.volume.ijk_to_ras_points(centre_kji[::-1])[0]

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
    ) -> str:
        """Segment slice ``index`` from the prompts on it and write that slice only (the
        rest of the segment is kept). One undo step. Returns the segment ID."""
        result = self.compute_slice(session, prompts, index)
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

    def write_preview(
        self,
        clean_session: SegmentationSession,
        corrupted_session: SegmentationSession,
        comparison: PreviewComparison,
    ) -> tuple[Any, Any]:
        """Write the two preview masks, each into its own segmentation node (reused when
        present) so that each slice view can show one: ``... (clean)`` on the clean
        volume's grid, ``... (corrupted)`` on the copy's. Returns the two nodes."""
        nodes = []
        for label, session, mask, color in (
            ("clean", clean_session, comparison.clean_mask, (0.0, 0.86, 1.0)),
            ("corrupted", corrupted_session, comparison.corrupted_mask, (1.0, 0.82, 0.0)),
        ):
            name = f"{PREVIEW_SEGMENTATION_NAME} ({label})"
            node = slicer.mrmlScene.GetFirstNodeByName(name)
            if node is None or not node.IsA("vtkMRMLSegmentationNode"):
                node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
            existing = node.GetSegmentation().GetSegmentIdBySegmentName(label)
            segment_id = self.write_mask(
                node,
                self.volume_node_of(session),
                mask,
                existing or None,
                True,
                segment_name=label,
                reference=session.volume,
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

    # --- dependencies ----------------------------------------------------------------

    @staticmethod
    def dependency_plan():
        """``(requirements, plan)``: the library's checked requirements (torch and
        torchvision as minimum versions: ``dependencies.for_slicer``) and an
        ``InstallPlan`` for the missing ones (nothing is installed here)."""
        from RobustMedSAMLib import dependencies

        requirements = dependencies.check(dependencies.for_slicer(dependencies.required()))
        return requirements, dependencies.install_plan(requirements)


# --- background work (no Qt: the panel polls it from a QTimer) --------------------------


class BackgroundTask:
    """Runs ``function(progress, cancel)`` in a daemon thread.

    The function must not touch MRML or Qt. ``poll()`` (main thread) returns the events
    since the last call: ``("progress", (done, total))``, then one of ``("done", result)``,
    ``("cancelled", None)`` or ``("error", exception)``.
    """

    def __init__(self, name: str, function: Callable[..., Any]) -> None:
        self.name = name
        self._function = function
        self._events: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"RobustMedSAM {name}", daemon=True)
        self.finished = False

    def start(self) -> BackgroundTask:
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the work to stop at its next check."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def poll(self) -> list[tuple[str, Any]]:
        events = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return events
            if event[0] in ("done", "cancelled", "error"):
                self.finished = True
            events.append(event)

    def _run(self) -> None:
        def progress(done: int, total: int) -> None:
            self._events.put(("progress", (int(done), int(total))))

        try:
            result = self._function(progress, self._cancel.is_set)
        except CancelledError:
            self._events.put(("cancelled", None))
        except Exception as error:  # reported to the main thread, shown there
            log.debug("background task %s failed", self.name, exc_info=True)
            self._events.put(("error", error))
        else:
            if self._cancel.is_set():
                self._events.put(("cancelled", None))
            else:
                self._events.put(("done", result))


class RobustMedSAMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: turns GUI events into Logic calls; model work runs in a worker thread.

    One ``BackgroundTask`` runs at a time (``self._task``); a QTimer polls it on the
    main thread, which alone touches MRML. A click while slices are being encoded
    cancels the encoding, segments the clicked slice, then resumes encoding.
    """

    POLL_MS = 100
    DEBOUNCE_MS = 250

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: RobustMedSAMLogic | None = None
        self._parameterNode: RobustMedSAMParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._task: BackgroundTask | None = None
        self._on_done: Callable[[Any], None] | None = None
        self._pending: Callable[[], None] | None = None
        self._predictor = None
        self._model_key: tuple | None = None
        self._model_id = ""
        self._sessions: dict[str, Any] = {}
        self._session_volume_id: str | None = None
        self._dirty_view_axis: str | None = None
        self._rows: list[ConfidenceRow] = []
        self._rows_session = None
        self._observed_markups: list = []
        self._dependencies_checked = False
        self._finetune = None

    # --- set-up ----------------------------------------------------------------------

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RobustMedSAM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = RobustMedSAMLogic()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_MS)
        self._pollTimer.connect("timeout()", self._poll)
        self._debounceTimer = qt.QTimer()
        self._debounceTimer.setSingleShot(True)
        self._debounceTimer.setInterval(self.DEBOUNCE_MS)
        self._debounceTimer.connect("timeout()", self._onPromptsSettled)
        self._finetuneTimer = qt.QTimer()
        self._finetuneTimer.setInterval(500)
        self._finetuneTimer.connect("timeout()", self._pollFinetune)
        self._undoShortcut = qt.QShortcut(qt.QKeySequence(UNDO_KEYS), slicer.util.mainWindow())
        self._undoShortcut.connect("activated()", self.onUndoShortcut)
        self._undoShortcut.setEnabled(False)
        self._borrowedUndo: list = []  # Slicer's own actions on Ctrl+Z, while we hold it

        self.ui.positivePlaceWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.negativePlaceWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.roiPlaceWidget.setMRMLScene(slicer.mrmlScene)
        for widget in (self.ui.positivePlaceWidget, self.ui.negativePlaceWidget):
            widget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.inputVolumeSelector.connect(
            "currentNodeChanged(vtkMRMLNode*)", self.onVolumeChanged
        )
        self.ui.segmentationSelector.connect(
            "currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged
        )
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentChanged)
        self.ui.positiveSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onMarkupsChanged)
        self.ui.negativeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onMarkupsChanged)
        self.ui.roiSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onMarkupsChanged)
        self.ui.checkpointPathLineEdit.connect("currentPathChanged(QString)", self.onCheckpointPath)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.encodeButton.connect("clicked(bool)", self.onEncode)
        self.ui.segmentSliceButton.connect("clicked(bool)", self.onSegmentSlice)
        self.ui.propagateButton.connect("clicked(bool)", self.onPropagate)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.confidenceTable.connect("cellDoubleClicked(int,int)", self.onConfidenceRow)
        self.ui.nextUnsureButton.connect("clicked(bool)", self.onNextUnsure)
        self.ui.previewButton.connect("clicked(bool)", self.onPreview)
        self.ui.finetuneDataPathLineEdit.connect(
            "currentPathChanged(QString)", self.onFinetunePaths
        )
        self.ui.finetuneConfigPathLineEdit.connect(
            "currentPathChanged(QString)", self.onFinetunePaths
        )
        self.ui.finetuneOutputPathLineEdit.connect(
            "currentPathChanged(QString)", self.onFinetunePaths
        )
        self.ui.finetuneStartButton.connect("clicked(bool)", self.onFinetuneStart)
        self.ui.finetuneStopButton.connect("clicked(bool)", self.onFinetuneStop)
        self.ui.installButton.connect("clicked(bool)", self.onInstallDependencies)

        self.ui.confidenceTable.setColumnCount(4)
        self.ui.confidenceTable.setHorizontalHeaderLabels(["Slice", "Score", "Overlap", "Unsure"])
        self.ui.confidenceTable.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.ui.confidenceTable.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        self._setBusy(None)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Module closed: stop the work, observers and timers."""
        if self._task is not None:
            self._task.cancel()
        if self._finetune is not None and self._finetune.running:
            self._finetune.stop(timeout=5.0)
        for timer in (self._pollTimer, self._debounceTimer, self._finetuneTimer):
            timer.stop()
        self._releaseUndoShortcut()
        self._undoShortcut.setParent(None)  # one QShortcut per Reload would stay behind
        self._observeMarkups([])
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.onMarkupsChanged()  # observe the prompt nodes again (exit stopped it)
        self._takeUndoShortcut()
        if not self._dependencies_checked:
            self._dependencies_checked = True
            qt.QTimer.singleShot(0, self.checkDependencies)

    def exit(self) -> None:
        """The module is hidden: points edited elsewhere no longer write segments."""
        self._releaseUndoShortcut()
        self._debounceTimer.stop()
        self._observeMarkups([])
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons
            )
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onMarkupsChanged
            )

    def onSceneStartClose(self, caller, event) -> None:
        if self._task is not None:
            self._task.cancel()
        self._forgetSessions()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        node = self._parameterNode
        if not node.input_volume:
            node.input_volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not node.positive_points:
            node.positive_points = self._newPointList("include", (0.1, 0.9, 0.1))
        if not node.negative_points:
            node.negative_points = self._newPointList("exclude", (0.95, 0.2, 0.2))

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons
            )
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onMarkupsChanged
            )
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self.addObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onMarkupsChanged
            )
            self._syncUnboundWidgets()
            self.onMarkupsChanged()
        self._updateButtons()

    def _syncUnboundWidgets(self) -> None:
        """Widgets without a parameter-node connector: path edits and the segment. Their
        signals are blocked meanwhile: ctkPathLineEdit emits currentPathChanged on every
        set (whose slot would store the other, not yet synced, paths) and the segment
        selector picks a segment of its own (see :meth:`_showSegment`)."""
        node = self._parameterNode
        widgets = (
            (self.ui.checkpointPathLineEdit, node.checkpoint_path),
            (self.ui.finetuneDataPathLineEdit, node.finetune_data_folder),
            (self.ui.finetuneConfigPathLineEdit, node.finetune_config),
            (self.ui.finetuneOutputPathLineEdit, node.finetune_output),
        )
        for widget, path in widgets:
            blocked = widget.blockSignals(True)
            widget.currentPath = path
            widget.blockSignals(blocked)
        self._showSegment(node.segmentation, node.segment_id)

    def _newPointList(self, name: str, color: tuple[float, float, float]):
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        points.CreateDefaultDisplayNodes()
        points.GetDisplayNode().SetSelectedColor(*color)
        points.GetDisplayNode().SetActiveColor(*color)
        return points

    # --- parameter changes -----------------------------------------------------------

    def onVolumeChanged(self, node=None) -> None:
        # Qt calls this slot before the parameter node's connector (connected later) has
        # stored the new volume: store it first, or onEncode would use the old one.
        if self._parameterNode is not None and self._parameterNode.input_volume is not node:
            self._parameterNode.input_volume = node
        self._forgetSessions()
        self._updateButtons()
        ready = importlib.util.find_spec("torch") is not None
        if node is not None and self._parameterNode is not None and self.parent.isEntered and ready:
            self.onEncode()

    def onSegmentationChanged(self, node=None) -> None:
        """Another segmentation: keep the chosen segment only if it is in it; otherwise
        "None" (a new segment is created), never the first existing segment."""
        segment_id = self._parameterNode.segment_id if self._parameterNode else ""
        ids = node.GetSegmentation().GetSegmentIDs() if node is not None else ()
        segment_id = segment_id if segment_id in ids else ""
        self._showSegment(node, segment_id)
        if self._parameterNode is not None:
            self._parameterNode.segment_id = segment_id
        self._updateButtons()

    def _showSegment(self, segmentation, segment_id: str) -> None:
        """Show ``segment_id`` of ``segmentation`` ("" = None) in the segment selector.
        ``qMRMLSegmentSelectorWidget`` selects a new segmentation's first segment when its
        current ID is not in it (``populateSegmentCombobox``): signals are blocked while
        the node changes, then the wanted ID is set explicitly."""
        selector = self.ui.segmentSelector
        blocked = selector.blockSignals(True)
        selector.setCurrentNode(segmentation)
        selector.setCurrentSegmentID(segment_id or "")
        selector.blockSignals(blocked)

    def onSegmentChanged(self, segment_id: str) -> None:
        if self._parameterNode is not None:
            self._parameterNode.segment_id = segment_id or ""

    def onCheckpointPath(self, path: str) -> None:
        if self._parameterNode is not None:
            self._parameterNode.checkpoint_path = path
        self.onModelChanged()

    def onModelChanged(self, *_args) -> None:
        """A different model: the next action loads it (sessions are rebuilt)."""
        if self._model_key is not None and self._model_key != self._wantedModelKey():
            self._predictor, self._model_key = None, None
            self._forgetSessions()

    def onFinetunePaths(self, *_args) -> None:
        if self._parameterNode is None:
            return
        self._parameterNode.finetune_data_folder = self.ui.finetuneDataPathLineEdit.currentPath
        self._parameterNode.finetune_config = self.ui.finetuneConfigPathLineEdit.currentPath
        self._parameterNode.finetune_output = self.ui.finetuneOutputPathLineEdit.currentPath

    def onMarkupsChanged(self, *_args) -> None:
        """Point the place widgets at the chosen nodes and observe their points. Also runs
        on every parameter node change: a selector's own signal comes before its
        connector has stored the new node."""
        node = self._parameterNode
        if node is None:
            return
        self.ui.positivePlaceWidget.setCurrentNode(node.positive_points)
        self.ui.negativePlaceWidget.setCurrentNode(node.negative_points)
        self.ui.roiPlaceWidget.setCurrentNode(node.roi)
        nodes = [n for n in (node.positive_points, node.negative_points, node.roi) if n]
        if nodes != self._observed_markups:
            self._observeMarkups(nodes)

    def _observeMarkups(self, nodes: list) -> None:
        events = (
            slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
            slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent,
            slicer.vtkMRMLMarkupsNode.PointRemovedEvent,
        )
        for old in self._observed_markups:
            for event in events:
                self.removeObserver(old, event, self._onPointEvent)
        for new in nodes:
            for event in events:
                self.addObserver(new, event, self._onPointEvent)
        self._observed_markups = list(nodes)

    def _updateButtons(self, *_args) -> None:
        node = self._parameterNode
        busy = self._task is not None
        has_volume = bool(node and node.input_volume)
        has_segmentation = bool(node and node.segmentation)
        self.ui.encodeButton.enabled = has_volume and not busy
        self.ui.segmentSliceButton.enabled = has_volume and has_segmentation and not busy
        self.ui.propagateButton.enabled = has_volume and has_segmentation and not busy
        self.ui.previewButton.enabled = has_volume and not busy
        self.ui.cancelButton.enabled = busy
        can_undo = has_segmentation and self.logic.can_undo(node.segmentation)
        self.ui.undoButton.enabled = bool(can_undo) and not busy
        self.ui.nextUnsureButton.enabled = any(r.flagged for r in self._rows)
        running = self._finetune is not None and self._finetune.running
        self.ui.finetuneStartButton.enabled = not running
        self.ui.finetuneStopButton.enabled = running

    # --- model and sessions ----------------------------------------------------------

    def _wantedModelKey(self) -> tuple:
        node = self._parameterNode
        return (node.model_name, node.checkpoint_path.strip(), node.device)

    def _forgetSessions(self) -> None:
        self._sessions.clear()
        self._session_volume_id = None
        self._rows, self._rows_session = [], None

    def _axisForEvent(self) -> str:
        """The axis to slice: the panel's choice, or (``view``) the orientation of the
        slice view under the mouse (where the point was just placed); else axial."""
        chosen = self._parameterNode.axis
        if chosen != "view":
            return chosen
        crosshair = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        if crosshair is not None:
            xyz = [0.0, 0.0, 0.0]
            slice_node = crosshair.GetCursorPositionXYZ(xyz)
            if slice_node is not None:
                axis = ORIENTATION_AXES.get(slice_node.GetOrientation())
                if axis:
                    self._dirty_view_axis = axis
                    return axis
        return self._dirty_view_axis or "axial"

    def _withSession(self, axis: str, then: Callable[[Any], None]) -> None:
        """Call ``then(session)`` on the main thread once the model is loaded (in the
        background) and a session exists for the volume along ``axis``."""
        node = self._parameterNode
        volume_node = node.input_volume
        if volume_node is None:
            slicer.util.errorDisplay("Select an input volume first.")
            return
        if self._session_volume_id != volume_node.GetID():
            self._forgetSessions()
            self._session_volume_id = volume_node.GetID()
        if self._predictor is None or self._model_key != self._wantedModelKey():
            key = self._wantedModelKey()
            name, checkpoint, device = key

            def loaded(result) -> None:
                self._predictor, model_id = result
                self._model_key = key
                self._model_id = model_id
                self._forgetSessions()
                self._session_volume_id = volume_node.GetID()
                self._withSession(axis, then)

            self._run(
                f"Loading model '{name}'",
                lambda progress, cancel: self.logic.load_model(name, checkpoint, device),
                loaded,
            )
            return
        if axis not in self._sessions:
            with self._showingErrors("Starting a session"):
                self._sessions[axis] = self.logic.start_session(
                    volume_node, predictor=self._predictor, axis=axis, model_id=self._model_id
                )
        if axis in self._sessions:
            then(self._sessions[axis])

    # --- background task plumbing ----------------------------------------------------

    def _run(self, label: str, function, on_done: Callable[[Any], None]) -> bool:
        """Start ``function(progress, cancel)`` in the worker; ``on_done(result)`` runs on
        the main thread. Returns False (and does nothing) while another task runs."""
        if self._task is not None:
            return False
        self._task = BackgroundTask(label, function).start()
        self._on_done = on_done
        self._setBusy(label)
        self._pollTimer.start()
        return True

    def _poll(self) -> None:
        task = self._task
        if task is None:
            self._pollTimer.stop()
            return
        for kind, value in task.poll():
            if kind == "progress":
                done, total = value
                self.ui.progressBar.maximum = max(1, total)
                self.ui.progressBar.value = done
                continue
            self._task, on_done = None, self._on_done
            self._on_done = None
            self._pollTimer.stop()
            self._setBusy(None)
            try:
                if kind == "done":
                    with self._showingErrors(task.name):
                        on_done(value)
                elif kind == "cancelled":
                    self._status(f"{task.name}: cancelled.")
                else:
                    self._showError(task.name, value)
            finally:
                self._startPending()  # a queued click or resumed encoding is never dropped
            return

    def _startPending(self) -> None:
        if self._task is None and self._pending is not None:
            pending, self._pending = self._pending, None
            pending()

    def _setBusy(self, label: str | None) -> None:
        self.ui.progressBar.visible = label is not None
        self.ui.progressBar.value = 0
        if label:
            self._status(f"{label}...")
        self._updateButtons()

    def _status(self, text: str) -> None:
        self.ui.statusLabel.text = text
        log.info(text)

    @contextmanager
    def _showingErrors(self, what: str) -> Iterator[None]:
        """Run the block; an error is shown once (:meth:`_showError`) and goes no further.
        ``slicer.util.tryWithErrorDisplay`` re-raises (``Base/Python/slicer/util.py``):
        nested uses show two dialogs and the exception escapes the Qt slot."""
        try:
            yield
        except Exception as error:
            self._showError(what, error)

    def _showError(self, what: str, error: Exception) -> None:
        if isinstance(error, InputError):
            self._status(f"{what}: {error}")
            if not what.startswith("Segmenting slice"):  # a click: the status line suffices
                slicer.util.warningDisplay(str(error), windowTitle=what)
        else:
            log.error("%s failed", what, exc_info=error)
            slicer.util.errorDisplay(f"{what} failed: {error}", detailedText=repr(error))

    def onCancel(self) -> None:
        if self._task is not None:
            self._pending = None
            self._task.cancel()
            self._status(f"{self._task.name}: cancelling...")

    # --- workflow: encode, click, propagate, undo ------------------------------------

    def onEncode(self) -> None:
        """Encode the slices around the one in view, in the background."""
        if not self._dependenciesReady():
            return
        axis = self._axisForEvent()

        def encode(session) -> None:
            centre = self._sliceInView(session)
            self._run(
                f"Encoding {axis} slices",
                lambda progress, cancel: self.logic.encode_ahead(session, centre, progress, cancel),
                lambda order: self._status(f"{len(order)} {axis} slices encoded: place points."),
            )

        self._withSession(axis, encode)

    def _sliceInView(self, session) -> int:
        """The session's slice at the Red view's centre (the volume's middle otherwise)."""
        try:
            slice_node = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
            matrix = slice_node.GetSliceToRAS()
            centre = [matrix.GetElement(r, 3) for r in range(3)]
            return self.logic.slice_of_point(session, centre)
        except (AttributeError, InputError):
            return session.n_slices // 2

    def _onPointEvent(self, caller, event) -> None:
        """A point was placed, moved or removed: segment its slice after a short pause."""
        if self._parameterNode is None or not self._parameterNode.auto_update:
            return
        self._lastPointNode = caller
        self._lastAxis = self._axisForEvent()
        self._debounceTimer.start()

    def _onPromptsSettled(self) -> None:
        if self._task is not None:
            if self._task.name.startswith("Encoding"):
                self._task.cancel()  # the click is more urgent; encoding resumes after
            self._pending = self._onPromptsSettled
            return
        self._segmentSliceOfLastPoint()

    def _lastPointRas(self):
        node = getattr(self, "_lastPointNode", None)
        if node is None or node.GetNumberOfDefinedControlPoints() == 0:
            return None
        if node.IsA("vtkMRMLMarkupsROINode"):
            centre = [0.0, 0.0, 0.0]
            node.GetCenterWorld(centre)
            return centre
        for index in reversed(range(node.GetNumberOfControlPoints())):
            if node.GetNthControlPointPositionStatus(index) == node.PositionDefined:
                position = [0.0, 0.0, 0.0]
                node.GetNthControlPointPositionWorld(index, position)
                return position
        return None

    def _segmentSliceOfLastPoint(self) -> None:
        point = self._lastPointRas()
        if point is None or not self._dependenciesReady():
            return
        axis = getattr(self, "_lastAxis", None) or self._axisForEvent()
        self._withSession(axis, lambda session: self._segmentSliceAt(session, point))

    def onSegmentSlice(self) -> None:
        """Segment the slice of the last placed point (or the slice in view)."""
        if not self._dependenciesReady():
            return
        point = self._lastPointRas()
        axis = self._axisForEvent()
        self._withSession(axis, lambda session: self._segmentSliceAt(session, point))

    def _segmentSliceAt(self, session, point_ras) -> None:
        node = self._parameterNode
        with self._showingErrors("Segmenting slice: reading the prompts"):
            prompts = self.logic.prompts_from_nodes(
                node.positive_points, node.negative_points, node.roi
            )
            index = (
                self._sliceInView(session)
                if point_ras is None
                else self.logic.slice_of_point(session, point_ras)
            )

            def write(result: SliceResult) -> None:
                self._ensureSegmentation()
                masking = self._masking(slice_box(session.volume.shape, result.axis, index))
                segment_id = self.logic.write_slice(
                    session,
                    result,
                    node.segmentation,
                    node.segment_id or None,
                    masking.overwrite_other_segments,
                    masking.editable_mask,
                    segment_name=DEFAULT_SEGMENT_NAME,
                )
                self._rememberSegment(segment_id)
                self._status(f"Slice {index} segmented (score {result.score:.2f}).")
                self._resumeEncoding(session, index)

            self._run(
                f"Segmenting slice {index}",
                lambda progress, cancel: self.logic.compute_slice(session, prompts, index),
                write,
            )

    def _resumeEncoding(self, session, centre: int) -> None:
        """Encode ahead around ``centre`` again once nothing else waits."""
        if self._pending is not None or len(session.stats.encoded) >= session.n_slices:
            return

        def encode() -> None:
            self._run(
                "Encoding slices (resumed)",
                lambda progress, cancel: self.logic.encode_ahead(session, centre, progress, cancel),
                lambda order: self._status("Slices encoded."),
            )

        self._pending = encode

    def onPropagate(self) -> None:
        """Segment the prompted slices and propagate into 3D, in the background."""
        if not self._dependenciesReady():
            return
        node = self._parameterNode
        axis = self._axisForEvent()

        def propagate(session) -> None:
            with self._showingErrors("Propagating"):
                prompts = self.logic.prompts_from_nodes(
                    node.positive_points, node.negative_points, node.roi
                )
                options = self._segmentOptions(propagate=True)

                def write(result) -> None:
                    self._ensureSegmentation()
                    masking = self._masking()
                    segment_id = self.logic.write_mask(
                        node.segmentation,
                        node.input_volume,
                        result.mask,
                        node.segment_id or None,
                        masking.overwrite_other_segments,
                        masking.editable_mask,
                        segment_name=DEFAULT_SEGMENT_NAME,
                        reference=session.volume,
                    )
                    self._rememberSegment(segment_id)
                    self._showConfidence(session, result.slices)
                    self._status(
                        f"Propagated: {int(result.mask.sum())} voxels on {len(result.slices)} "
                        f"slices in {result.seconds:.1f} s."
                    )

                self._run(
                    "Propagating",
                    lambda progress, cancel: self.logic.compute(
                        session, prompts, options, progress, cancel
                    ),
                    write,
                )

        self._withSession(axis, propagate)

    def _segmentOptions(self, propagate: bool):
        from RobustMedSAMLib.inference.propagation import PropagationOptions
        from RobustMedSAMLib.inference.segment_volume import SegmentOptions

        node = self._parameterNode
        options = PropagationOptions(
            projection=node.projection,
            box_extension=node.box_extension,
            iou_threshold=node.stop_iou,
            overlap=node.overlap_measure,
            min_score=node.min_score,
            min_area_ratio=node.min_area_ratio,
            stop_between_seeds=node.stop_between_seeds,
        )
        options.validate()
        return SegmentOptions(
            propagate=propagate, propagation=options, zoom=node.zoom_to_box or "auto"
        )

    def _ensureSegmentation(self) -> None:
        node = self._parameterNode
        if node.segmentation is None:
            segmentation = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", f"{node.input_volume.GetName()} RobustMedSAM"
            )
            segmentation.CreateDefaultDisplayNodes()
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(node.input_volume)
            node.segmentation = segmentation

    def _masking(self, box: tuple[slice, slice, slice] | None = None) -> EditorMasking:
        """The Segment Editor's masking settings (on ``box`` of the grid, all of it when
        None) when asked for and the editor has a node in the scene; otherwise this
        panel's "overwrite other segments" choice (unchecked: overlap allowed)."""
        node = self._parameterNode
        editor = _segment_editor_node() if node.use_editor_masking else None
        if editor is None:
            return EditorMasking(None, node.overwrite_other_segments, box)
        return self.logic.editor_masking(
            editor, node.segmentation, node.input_volume, node.segment_id or None, box
        )

    def _rememberSegment(self, segment_id: str) -> None:
        self._parameterNode.segment_id = segment_id
        self._showSegment(self._parameterNode.segmentation, segment_id)
        self._updateButtons()

    def _takeUndoShortcut(self) -> None:
        """Hold Ctrl+Z while the module is shown. Two shortcuts on one key would both be
        ambiguous and neither would fire, so Slicer's own actions on it (Edit > Undo)
        give up the key until :meth:`_releaseUndoShortcut`; ours passes it on to them
        when this module has nothing to undo."""
        keys = qt.QKeySequence(UNDO_KEYS)
        for action in slicer.util.mainWindow().findChildren(qt.QAction):
            if action.shortcut.matches(keys) == qt.QKeySequence.ExactMatch:
                action.setShortcut(qt.QKeySequence())
                self._borrowedUndo.append(action)
        self._undoShortcut.setEnabled(True)

    def _releaseUndoShortcut(self) -> None:
        self._undoShortcut.setEnabled(False)
        for action in self._borrowedUndo:
            action.setShortcut(qt.QKeySequence(UNDO_KEYS))
        self._borrowedUndo = []

    def onUndoShortcut(self) -> None:
        """Ctrl+Z: undo our last write, or Slicer's own undo when we have none."""
        node = self._parameterNode
        if node is not None and node.segmentation is not None and self._task is None:
            if self.logic.can_undo(node.segmentation):
                self.onUndo()
                return
        for action in self._borrowedUndo:
            if action.enabled:
                action.trigger()
                return

    def onUndo(self) -> None:
        """Restore the segment(s) as they were before the last write (Ctrl+Z)."""
        node = self._parameterNode
        if node is None or node.segmentation is None or self._task is not None:
            return
        if self.logic.undo_last(node.segmentation):
            self._status("Undone.")
        else:
            self._status("Nothing to undo.")
        self._updateButtons()

    # --- per-slice confidence --------------------------------------------------------

    def _showConfidence(self, session, scores) -> None:
        node = self._parameterNode
        self._rows = self.logic.confidence_rows(scores, node.flag_score, node.flag_overlap)
        self._rows_session = session
        table = self.ui.confidenceTable
        table.setRowCount(len(self._rows))
        for row, item in enumerate(self._rows):
            overlap = "" if math.isnan(item.overlap) else f"{item.overlap:.2f}"
            cells = (str(item.index), f"{item.score:.2f}", overlap, "yes" if item.flagged else "")
            for column, text in enumerate(cells):
                cell = qt.QTableWidgetItem(text)
                if item.flagged:
                    cell.setBackground(qt.QBrush(qt.QColor(255, 220, 160)))
                table.setItem(row, column, cell)
        flagged = sum(r.flagged for r in self._rows)
        self.ui.confidenceSummaryLabel.text = f"{len(self._rows)} slices, {flagged} unsure"
        self._updateButtons()

    def onConfidenceRow(self, row: int, _column: int = 0) -> None:
        if 0 <= row < len(self._rows):
            self._jumpToSlice(self._rows[row].index)

    def onNextUnsure(self) -> None:
        current = self.ui.confidenceTable.currentRow()
        after = self._rows[current].index if 0 <= current < len(self._rows) else None
        index = self.logic.next_unsure(self._rows, after)
        if index is None:
            return
        row = next(i for i, r in enumerate(self._rows) if r.index == index)
        self.ui.confidenceTable.selectRow(row)
        self._jumpToSlice(index)

    def _jumpToSlice(self, index: int) -> None:
        """Centre every slice view on the middle of slice ``index``."""
        if self._rows_session is None:
            return
        x, y, z = self.logic.slice_centre_ras(self._rows_session, index)
        for name in slicer.app.layoutManager().sliceViewNames():
            slice_node = slicer.app.layoutManager().sliceWidget(name).mrmlSliceNode()
            slice_node.JumpSliceByCentering(x, y, z)

    # --- corruption preview ----------------------------------------------------------

    def onPreview(self) -> None:
        """Corrupted copy -> both sessions segmented with the current prompts -> side by
        side, each with its mask, and the Dice between them."""
        if not self._dependenciesReady():
            return
        node = self._parameterNode
        axis = self._axisForEvent()

        def preview(session) -> None:
            with self._showingErrors("Preparing the preview"):
                prompts = self.logic.prompts_from_nodes(
                    node.positive_points, node.negative_points, node.roi
                )
                options = self._segmentOptions(propagate=self.ui.previewPropagateCheckBox.checked)
                name, severity, seed = node.corruption, node.severity, node.corruption_seed

                def corrupted(array) -> None:
                    copy = self.logic.corrupted_copy(node.input_volume, name, severity, array=array)
                    other = self.logic.preview_session(session, copy)
                    self._run(
                        "Segmenting clean and corrupted",
                        lambda progress, cancel: self.logic.compare(
                            session, other, prompts, options, progress, cancel
                        ),
                        lambda comparison: self._showPreview(session, other, comparison),
                    )

                self._run(
                    f"Corrupting ({name}, severity {severity})",
                    lambda progress, cancel: self.logic.corrupted_array(
                        session.volume, name, severity, seed
                    ),
                    corrupted,
                )

        self._withSession(axis, preview)

    def _showPreview(self, clean, corrupted, comparison: PreviewComparison) -> None:
        """Side by side: Red shows the clean volume and its mask, Yellow the copy and its."""
        nodes = self.logic.write_preview(clean, corrupted, comparison)
        layout = slicer.app.layoutManager()
        layout.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutSideBySideView)
        views = []
        for view, session, segmentation in zip(
            ("Red", "Yellow"), (clean, corrupted), nodes, strict=True
        ):
            widget = layout.sliceWidget(view)
            volume_id = self.logic.volume_node_of(session).GetID()
            widget.mrmlSliceCompositeNode().SetBackgroundVolumeID(volume_id)
            slice_node = widget.mrmlSliceNode()
            display = segmentation.GetDisplayNode()
            display.RemoveAllViewNodeIDs()
            display.AddViewNodeID(slice_node.GetID())
            views.append(slice_node)
        views[1].SetOrientation(views[0].GetOrientation())
        self.ui.previewDiceLabel.text = (
            f"Dice clean vs corrupted: {comparison.dice:.3f} "
            f"(clean {int(comparison.clean_mask.sum())} voxels, corrupted "
            f"{int(comparison.corrupted_mask.sum())})"
        )
        self._status(f"Preview ready: Dice {comparison.dice:.3f}.")

    # --- fine-tuning -----------------------------------------------------------------

    def onFinetuneStart(self) -> None:
        if not self._dependenciesReady():
            return
        node = self._parameterNode
        with self._showingErrors("Starting fine-tuning"):
            if not node.finetune_output:
                raise InputError("choose an output folder for the fine-tuning run")
            out_dir = Path(node.finetune_output)
            out_dir.mkdir(parents=True, exist_ok=True)
            if node.finetune_source == "scene":
                data = out_dir / "data"
                pairs = self.logic.export_scene_training_data(data, overwrite=True)
                self._status(f"Exported {len(pairs)} image/label pairs to {data}.")
            else:
                if not node.finetune_data_folder:
                    raise InputError("choose the MedSegBench folder to train on")
                data = Path(node.finetune_data_folder)
            run = out_dir / time.strftime("run_%Y%m%d_%H%M%S")
            config = self.logic.write_finetune_config(
                run.with_suffix(".toml"), data, node.finetune_config or None
            )
            self._finetune = self.logic.start_finetune(config, run)
            self.ui.finetuneProgressBar.value = 0
            self.ui.finetuneStatusLabel.text = "Fine-tuning started."
            self._finetuneTimer.start()
        self._updateButtons()

    def _pollFinetune(self) -> None:
        from RobustMedSAMLib.training.process import describe, progress_of

        process = self._finetune
        if process is None:
            self._finetuneTimer.stop()
            return
        for event in process.poll():
            self.ui.finetuneStatusLabel.text = describe(event)
            done_total = progress_of(event)
            if done_total is not None:
                done, total = done_total
                self.ui.finetuneProgressBar.maximum = max(1, total)
                self.ui.finetuneProgressBar.value = done
        if process.running:
            return
        self._finetuneTimer.stop()
        model = process.model_path() if process.returncode == 0 else None
        if model is not None:
            self.ui.finetuneStatusLabel.text = f"Finished: {model}"
            self._parameterNode.model_name = "fused"
            self._parameterNode.checkpoint_path = str(model)
            self.ui.checkpointPathLineEdit.currentPath = str(model)
            self.onModelChanged()
            self._status("The fine-tuned model is selected (model 'fused', its checkpoint).")
        else:
            message = process.last_error or f"exit code {process.returncode}"
            self.ui.finetuneStatusLabel.text = f"Stopped: {message}"
        self._updateButtons()

    def onFinetuneStop(self) -> None:
        if self._finetune is not None and self._finetune.running:
            self.ui.finetuneStatusLabel.text = "Stopping (a checkpoint is kept)..."
            self._finetune.stop(timeout=30.0)
        self._updateButtons()

    # --- dependencies ----------------------------------------------------------------

    def _dependenciesReady(self) -> bool:
        """True when torch is installed; otherwise offer the installation."""
        if importlib.util.find_spec("torch") is None:  # no import: it takes seconds
            return self.checkDependencies(ask=True)
        return True

    def checkDependencies(self, ask: bool = True) -> bool:
        """Check the library's requirements; offer to install what is missing."""
        try:
            requirements, plan = self.logic.dependency_plan()
        except Exception as error:  # a broken environment must not break the panel
            log.warning("dependency check failed: %s", error)
            return True
        missing = [r for r in requirements if not r.ok]
        self.ui.dependencyLabel.text = (
            "All dependencies are installed."
            if not missing
            else "Missing: " + ", ".join(f"{r.spec} ({r.problem})" for r in missing)
        )
        self.ui.installButton.enabled = not plan.empty
        if plan.empty:
            return not missing
        if ask:
            return self._install(plan)
        return False

    def onInstallDependencies(self) -> None:
        self.checkDependencies(ask=True)

    def _install(self, plan) -> bool:
        """Install ``plan`` after confirmation, with a progress dialog; explain failures."""

        text = (
            "RobustMedSAM needs Python packages that are not installed in Slicer's Python:"
            f"\n\n{plan.summary()}\n\nDownload and install them now? (a few minutes; "
            "Slicer may look busy meanwhile)"
        )
        if not slicer.util.confirmOkCancelDisplay(text, windowTitle="Install dependencies"):
            self._status("Dependencies not installed: segmentation is unavailable.")
            return False
        constraints = None
        if plan.constraints:
            constraints = Path(slicer.app.temporaryPath) / "robustmedsam-constraints.txt"
            constraints.write_text("\n".join(plan.constraints) + "\n")
        # Slicer >= 5.12 shows its own progress dialog for each pip run: no second one
        steps = len(plan.pip) + (1 if plan.torch else 0)
        dialog = None if _slicer_packaging() else self._progressDialog(steps)
        try:
            if plan.torch and not self._installTorch(plan, constraints):
                return False
            for done, spec in enumerate(plan.pip, start=1 if plan.torch else 0):
                if dialog is not None:
                    dialog.setLabelText(f"Installing {spec} ({done + 1} of {steps})...")
                    dialog.setValue(done)
                slicer.app.processEvents()
                if not self._pipInstallExplained(spec, constraints):
                    return False
        finally:
            if dialog is not None:
                dialog.close()
        if plan.restart_needed:
            slicer.util.infoDisplay("Installed. Restart Slicer to use the new packages.")
        self.checkDependencies(ask=False)
        return True

    def _progressDialog(self, steps: int):
        dialog = qt.QProgressDialog("Installing...", "", 0, steps, slicer.util.mainWindow())
        dialog.setWindowTitle("RobustMedSAM: installing dependencies")
        dialog.setCancelButton(None)
        dialog.setMinimumDuration(0)
        dialog.setValue(0)
        return dialog

    def _pipInstallExplained(self, spec: str, constraints: Path | None) -> bool:
        """pip-install ``spec``; on failure say why, once. Slicer >= 5.12:
        ``slicer.packaging.pip_install``, which shows pip's log in its own error dialog
        (``Base/Python/slicer/packaging.py:759-764`` at v5.12.0) and raises without the
        output. Older: pip's output captured here (5.10's ``pip_install`` raises with
        ``output`` set to the spent file object) and explained
        (``dependencies.explain_failure``)."""
        from RobustMedSAMLib import dependencies

        packaging = _slicer_packaging()
        if packaging is not None:
            try:
                packaging.pip_install(
                    spec,
                    constraints=str(constraints) if constraints else None,
                    requester="RobustMedSAM",
                )
            except Exception as error:  # Slicer has shown pip's log
                self._status(f"Installing {spec} failed ({error}): see Slicer's message.")
                return False
            return True
        arguments = ["install", spec] + (["-c", str(constraints)] if constraints else [])
        code, output = run_pip(arguments)
        if code != 0:
            slicer.util.errorDisplay(
                dependencies.explain_failure(spec, output), windowTitle="Installation failed"
            )
            return False
        return True

    def _installTorch(self, plan, constraints: Path | None) -> bool:
        """PyTorch through the PyTorch extension (it picks the build for the GPU);
        through pip when the extension is not installed. Every failure is shown once:
        ``PyTorchUtilsLogic.installTorch`` raises ``CalledProcessError`` when
        light-the-torch fails (it returns None only when the user declines)."""
        try:
            import PyTorchUtils
        except ImportError:
            return all(self._pipInstallExplained(r.spec, constraints) for r in plan.torch)
        try:
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=False, **plan.torch_arguments()
            )
        except Exception as error:
            log.error("PyTorch installation failed", exc_info=error)
            torch = None
            reason = f"The PyTorch extension could not install it: {error}. "
        else:
            reason = ""
        if torch is None:
            slicer.util.errorDisplay(
                f"PyTorch was not installed. {reason}Install it from the PyTorch module "
                "(Utilities > PyTorch Utils), then open RobustMedSAM again.",
                windowTitle="Installation failed",
            )
            return False
        return True


def _slicer_packaging():
    """``slicer.packaging`` when this Slicer has its ``pip_install`` (5.12 and later)."""
    packaging = getattr(slicer, "packaging", None)
    if packaging is None:
        try:
            packaging = importlib.import_module("slicer.packaging")
        except ImportError:
            return None
    return packaging if hasattr(packaging, "pip_install") else None


def run_pip(arguments: list[str]) -> tuple[int, str]:
    """``PythonSlicer -m pip ARGUMENTS`` in Slicer's environment: ``(exit code, output)``,
    stdout and stderr together, the GUI kept alive meanwhile (line by line)."""
    command = [RobustMedSAMLogic.finetune_python(), "-m", "pip", *arguments]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    lines = []
    for line in process.stdout:
        lines.append(line)
        log.info(line.rstrip())
        slicer.app.processEvents()
    return process.wait(), "".join(lines)


class RobustMedSAMTest(ScriptedLoadableModuleTest):
    """End-to-end self-test in Slicer with the default model, LiteMedSAM (Developer mode >
    Reload and Test). The same steps run headless in Testing/test_slicer_module_ui.py."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_end_to_end_with_the_default_model()

    def reload_segmentation(self, path: Path):
        """Load a .seg.nrrd as a new segmentation node (Slicer's loader)."""
        return slicer.util.loadSegmentation(str(path))

    def test_end_to_end_with_the_default_model(self) -> None:
        """Phantom volume -> ROI around the ball -> propagate -> Dice >= 0.8 -> undo
        restores the empty segment -> save .seg.nrrd -> reload gives the same mask."""
        import tempfile

        from RobustMedSAMLib.datasets.phantoms import sphere
        from RobustMedSAMLib.inference.segment_volume import SegmentOptions

        self.delayDisplay("Starting the RobustMedSAM end-to-end test")
        # 4 mm slices: the ball spans 11 of them (LiteMedSAM encodes each in about 1.5 s)
        phantom = sphere((14, 96, 96), (1.0, 1.0, 4.0), radius=22.0, seed=101)
        volume_node = slicer.util.addVolumeFromArray(phantom.image, name="phantom")
        volume_node.SetIJKToRASMatrix(_vtk_matrix(phantom.ijk_to_ras))
        kji = np.argwhere(phantom.mask)
        corners_ijk = np.c_[[kji.min(axis=0)[::-1] - 1.0, kji.max(axis=0)[::-1] + 1.0], [1, 1]]
        corners = (phantom.ijk_to_ras @ corners_ijk.T)[:3]
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
        roi.SetCenter(*map(float, corners.mean(axis=1)))
        roi.SetSize(*map(float, np.abs(corners[:, 1] - corners[:, 0])))
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        segment_id = segmentation.GetSegmentation().AddEmptySegment("sphere", "sphere")
        self.assertEqual(segment_id, "sphere")

        logic = RobustMedSAMLogic()
        session = logic.start_session(volume_node, DEFAULT_MODEL, device="cpu", axis="axial")
        prompts = logic.prompts_from_nodes(None, None, roi)
        scores = logic.segment(
            session, prompts, SegmentOptions(propagate=True), segmentation, segment_id
        )
        mask = logic.segment_mask(segmentation, segment_id, volume_node)
        overlap = 2 * (mask & phantom.mask).sum() / (mask.sum() + phantom.mask.sum())
        self.delayDisplay(f"Dice vs truth {overlap:.3f} on {len(scores)} slices")
        self.assertGreaterEqual(overlap, 0.8)

        self.assertTrue(logic.undo_last(segmentation))
        self.assertFalse(logic.segment_mask(segmentation, segment_id, volume_node).any())
        self.assertIsNotNone(segmentation.GetSegmentation().GetSegment(segment_id))

        logic.segment(session, prompts, SegmentOptions(propagate=True), segmentation, segment_id)
        expected = logic.segment_mask(segmentation, segment_id, volume_node)
        with tempfile.TemporaryDirectory() as folder:
            path = logic.save_segmentation(segmentation, Path(folder) / "sphere.seg.nrrd")
            loaded = self.reload_segmentation(path)
            loaded_id = loaded.GetSegmentation().GetSegmentIdBySegmentName("sphere")
            reloaded = logic.segment_mask(loaded, loaded_id, volume_node)
        self.assertTrue(np.array_equal(reloaded, expected))
        self.delayDisplay("RobustMedSAM end-to-end test passed")
