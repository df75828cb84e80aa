"""The Logic's model work, through an inference server (``server_link``): the server to
use (a local process or a remote URL), one server session per (volume node, axis),
and the requests a click, a propagation or the encode-ahead make.

Every method returns at once with an :class:`~server_link.Operation` handle; callbacks
run later on the main thread (from the link's QTimer). Nothing here writes MRML: the
caller writes the masks it is handed (``mrml.py``), on the main thread.

Frames: masks are KJI on the volume node's voxel grid; points and boxes are world RAS
(the node's linear parent transform applied, as ``RobustMedSAMLogic.volume_from_node``).
Points and boxes are sent as continuous IJK indices with the slice axis pinned to the
requested slice, so the server segments exactly that slice.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from RobustMedSAMHelpers.server_link import (
    LinkSession,
    LocalServer,
    Operation,
    ServerLink,
    union_extent,
)
from RobustMedSAMLib.errors import InputError, ServerError
from RobustMedSAMLib.names import AXIS_NAMES


def axis_index(axis: str | int) -> int:
    """KJI array axis of ``axial``/``coronal``/``sagittal`` or 0..2."""
    if isinstance(axis, str):
        if axis not in AXIS_NAMES:
            raise InputError(f"axis {axis!r} is not one of {AXIS_NAMES} or 0, 1, 2")
        return AXIS_NAMES.index(axis)
    if axis not in (0, 1, 2):
        raise InputError(f"axis {axis!r} is not one of {AXIS_NAMES} or 0, 1, 2")
    return int(axis)


def box_corners_ras(box) -> np.ndarray:
    """``(N, 3)`` RAS corners of a box: ``(2, 3)`` opposite corners, a dict ``{"center",
    "size", "axes"}`` (unit axes as columns; default the RAS axes) or the library's
    ``Roi`` (``center_ras``, ``size``, ``axes_ras``)."""
    if hasattr(box, "center_ras"):
        box = {"center": box.center_ras, "size": box.size, "axes": box.axes_ras}
    if isinstance(box, dict):
        center, size = np.asarray(box["center"], float), np.asarray(box["size"], float)
        axes = np.eye(3) if box.get("axes") is None else np.asarray(box["axes"], float)
        signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)])
        return center + (signs * size / 2) @ axes.T
    corners = np.asarray(box, float)
    if corners.shape != (2, 3):
        raise InputError("a box is 2 opposite RAS corners (2x3), or center, size and axes")
    return corners


class ServerWork:
    """The server the Logic works through, and its sessions.

    ``qt``: Slicer's ``qt`` module. Choose the server with :meth:`use_local` or
    :meth:`use_remote`; requests made before a local server is ready wait for it.
    ``on_lost(error)``: called when a local server dies while no request was open to
    report it (else the open requests' ``on_error`` get the one error).
    """

    def __init__(self, qt, on_lost: Callable[[Exception], None] | None = None) -> None:
        self.qt = qt
        self.on_lost = on_lost
        self.link: ServerLink | None = None
        self.local: LocalServer | None = None
        self.info: dict[str, Any] = {}
        self._waiting: list[tuple[Operation, Callable[[ServerLink], None]]] = []
        self._sessions: dict[tuple, tuple[Any, LinkSession]] = {}
        self._opening: dict[tuple, list] = {}
        self._nodes: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    # --- which server --------------------------------------------------------------

    def use_remote(self, url: str, token: str, cafile: str | None = None) -> None:
        """Work through the server at ``url`` with ``token`` (no process is started)."""
        self.stop()
        if not token.strip():
            raise InputError("a remote server needs its token: paste it in the panel")
        self.link = ServerLink(url, token, self.qt, cafile=cafile)
        self.info = {"url": self.link.url, "mode": "remote"}

    def use_local(self, python: str, arguments: Sequence[str], pythonpath: Sequence[str]) -> None:
        """Start a local server process (``python`` + ``arguments``); requests wait for
        its ready line. See ``server_link.serve_arguments``."""
        self.stop()
        self.local = LocalServer(self.qt, python, arguments, pythonpath, self._ready, self._died)
        self.info = {"mode": "local", "state": "starting"}
        self.local.start()

    @property
    def configured(self) -> bool:
        return self.link is not None or self.local is not None

    def stop(self) -> None:
        """Close sessions' links and stop a local server (scene close, app exit, cleanup)."""
        if self.link is not None:
            self.link.close()
        if self.local is not None:
            self.local.stop()
        for operation, _then in self._waiting:
            operation.fail(ServerError("the server was stopped"))
        self.link, self.local, self._waiting, self.info = None, None, [], {}
        self.forget_sessions()

    def forget_sessions(self) -> None:
        """Drop every session (a new scene, another model); the server expires them."""
        if self.link is not None:
            for _, session in self._sessions.values():
                self.link.request("DELETE", session.path)
        self._sessions.clear()
        self._opening.clear()

    def _ready(self, url: str, token: str, info: dict) -> None:
        self.link = ServerLink(url, token, self.qt)
        self.link.wait_for_death = True
        self.info = {**info, "mode": "local", "state": "ready"}
        self.info.pop("token", None)
        waiting, self._waiting = self._waiting, []
        for operation, then in waiting:
            if operation.running:
                then(self.link)

    def _died(self, error: Exception) -> None:
        reported = False
        if self.link is not None:
            reported = bool(self.link.calls)
            self.link.fail_all(error)
        waiting, self._waiting = self._waiting, []
        for operation, _then in waiting:
            reported = reported or operation.running
            operation.fail(error)
        self.info = {"mode": "local", "state": "stopped", "error": str(error)}
        self._sessions.clear()
        self._opening.clear()
        if not reported and self.on_lost is not None:
            self.on_lost(error)

    def when_ready(self, operation: Operation, then: Callable[[ServerLink], None]) -> None:
        if self.link is not None:
            then(self.link)
        elif self.local is not None and not self.local.stopping:
            self._waiting.append((operation, then))
        elif self.local is not None:
            operation.fail(ServerError(self.info.get("error", "the local server stopped")))
        else:
            operation.fail(InputError("no server chosen: start the local one or give a URL"))

    # --- sessions ------------------------------------------------------------------

    def session(self, operation: Operation, volume_node, axis: int,
                then: Callable[[LinkSession], None]) -> None:  # fmt: skip
        """``then(session)`` for the node's volume along ``axis``, uploading it first when
        the server has none for its current voxels."""
        from RobustMedSAMHelpers.mrml import display_window

        key = (volume_node.GetID(), axis)
        stamp = _stamp(volume_node)
        known = self._sessions.get(key)
        if known is not None and known[0] == stamp:
            then(known[1])
            return
        waiters = self._opening.get(key)
        if waiters is not None:  # an upload of this volume is under way: wait for it
            waiters.append((operation, then))
            return
        try:
            array, ijk_to_ras = volume_arrays(volume_node)
        except InputError as error:
            operation.fail(error)
            return
        self._opening[key] = [(operation, then)]

        upload = Operation(None, lambda error: self._open_failed(key, error))

        def opened(session: LinkSession) -> None:
            upload.done()
            session.ijk_to_ras = ijk_to_ras
            self._sessions[key] = (stamp, session)
            for waiting, follow in self._opening.pop(key, []):
                if waiting.running:
                    follow(session)

        # an operation of its own: cancelling a click leaves the upload going, for later
        self.when_ready(upload, lambda link: LinkSession.open(
            link, array, ijk_to_ras, axis, display_window(volume_node), volume_node.GetName(),
            upload, opened))  # fmt: skip

    def _open_failed(self, key: tuple, error: Exception) -> None:
        for waiting, _follow in self._opening.pop(key, []):
            waiting.fail(error)

    # --- the requests --------------------------------------------------------------

    def slice(self, volume_node, axis, index: int, points_ras, labels, box_ras,
              on_done, on_error) -> Operation:  # fmt: skip
        """See ``RobustMedSAMLogic.request_slice``."""
        operation = Operation(on_done, on_error)
        try:
            axis = axis_index(axis)
            points = np.asarray(points_ras if points_ras is not None else [], float).reshape(-1, 3)
            labels = np.asarray(labels if labels is not None else [], int).reshape(-1)
            if len(points) != len(labels):
                raise InputError(f"{len(points)} points but {len(labels)} labels")
            if not (labels > 0).any() and box_ras is None:
                raise InputError(f"slice {index} has no include point and no box: add one")
        except InputError as error:
            operation.fail(error)
            return operation

        def go(session: LinkSession) -> None:
            _check_index(session, index)
            ijk = _pinned_ijk(session, points, index)
            body: dict[str, Any] = {
                "frame": "ijk",
                "positive": ijk[labels > 0].tolist() or None,
                "negative": ijk[labels <= 0].tolist() or None,
                "box": None,
                "propagate": False,
                "options": {},
            }
            if box_ras is not None:
                corners = _pinned_ijk(session, box_corners_ras(box_ras), index)
                body["box"] = {"low": corners.min(0).tolist(), "high": corners.max(0).tolist()}

            def segmented(result: dict) -> None:
                session.apply(result["patch"])
                slice_mask = np.take(session.mask, index, axis=session.axis).copy()
                scores = [s for s in result["record"].get("slices", []) if s["index"] == index]
                details = {"slice": index, "axis": session.axis,
                           "score": float(scores[0]["score"]) if scores else float("nan"),
                           "record": result["record"]}  # fmt: skip
                operation.done(slice_mask, details)

            session.run_job(operation, "segment", body, segmented)

        self.session(operation, volume_node, axis, _guarded(operation, go))
        return operation

    def propagate(self, volume_node, axis, seed_index: int, seed_mask, options,
                  on_progress, on_done, on_error) -> Operation:  # fmt: skip
        """See ``RobustMedSAMLogic.request_propagate``."""
        operation = Operation(on_done, on_error, on_progress)
        try:
            axis = axis_index(axis)
            seed_mask = np.asarray(seed_mask, bool)
            if not seed_mask.any():
                raise InputError(f"the seed slice {seed_index} is empty: segment it first")
        except InputError as error:
            operation.fail(error)
            return operation

        def go(session: LinkSession) -> None:
            _check_index(session, seed_index)
            expected = np.take(session.mask, seed_index, axis=session.axis).shape
            if seed_mask.shape != expected:
                raise InputError(f"seed mask {seed_mask.shape} is not a slice {expected}")
            patch, seed = session.mask_patch(seed_index, seed_mask)

            def grow(_answer=None) -> None:
                if _answer is not None:
                    session.apply(_answer["patch"])
                session.touched = seed  # everything else was cleared

                def grown(result: dict) -> None:
                    extent = session.apply(result["patch"])
                    region = seed if extent is None else union_extent(seed, extent)
                    changed = (
                        []
                        if extent is None
                        else list(range(extent[session.axis].start, extent[session.axis].stop))
                    )
                    details = {"seed": seed_index, "axis": session.axis,
                               "stops": result["stops"], "changed_slices": changed,
                               "filled": result.get("filled", [])}  # fmt: skip
                    operation.done(region, session.mask[region].copy(), details)

                body = {"seeds": [int(seed_index)], "options": dict(options or {})}
                session.run_job(operation, "propagate", body, grown)

            if patch is None:
                grow()
            else:
                operation.step(
                    lambda done, failed: session.link.request(
                        "POST", f"{session.path}/mask", {"patch": patch}, done, failed
                    ),
                    grow,
                )

        self.session(operation, volume_node, axis, _guarded(operation, go))
        return operation

    def segment(self, volume_node, axis, prompts, propagate: bool, options,
                on_progress, on_done, on_error) -> Operation:  # fmt: skip
        """``segment_volume`` on the server from world-RAS ``prompts`` (a library
        ``VolumePrompts``: ``positive``/``negative`` ``Nx3`` or None, ``roi`` or None);
        ``on_done(mask, record)`` with ``mask`` the ``(K, J, I)`` bool result (a copy)
        and ``record`` the run record (``record["slices"]``: per-slice scores)."""
        from RobustMedSAMLib.server.protocol import box_body, points_body

        operation = Operation(on_done, on_error, on_progress)
        try:
            body = {
                "frame": "ras",
                "positive": points_body(prompts.positive),
                "negative": points_body(prompts.negative),
                "box": box_body(prompts.roi),
                "propagate": bool(propagate),
                "options": dict(options or {}),
            }
            axis = axis_index(axis)
        except InputError as error:
            operation.fail(error)
            return operation

        def go(session: LinkSession) -> None:
            def segmented(result: dict) -> None:
                session.apply(result["patch"])
                operation.done(session.mask.copy(), result["record"])

            session.run_job(operation, "segment", body, segmented)

        self.session(operation, volume_node, axis, _guarded(operation, go))
        return operation

    def encode(self, volume_node, axis, centre: int, on_done=None, on_error=None,
               slice_step: int = 1) -> Operation:  # fmt: skip
        """Let the server encode slices around ``centre`` ahead of the clicks (it stops
        for any job), every ``slice_step``-th as propagation will ask them;
        ``on_done(queued)`` once it started."""
        operation = Operation(on_done, on_error)
        body = {"seeds": [int(centre)]}
        if slice_step != 1:  # a server from before the field refuses it; 1 is its default
            body["slice_step"] = int(slice_step)

        def go(session: LinkSession) -> None:
            _check_index(session, centre)
            operation.step(
                lambda done, failed: session.link.request(
                    "POST", f"{session.path}/encode", body, done, failed
                ),
                lambda answer: operation.done(int(answer["queued"])),
            )

        try:
            axis = axis_index(axis)
        except InputError as error:
            operation.fail(error)
            return operation
        self.session(operation, volume_node, axis, _guarded(operation, go))
        return operation

    def describe(self, volume_node, axis, on_done, on_error=None) -> Operation:
        """``on_done({"encoded", "n_slices", "busy", ...})`` for the node's session."""
        operation = Operation(on_done, on_error)

        def go(session: LinkSession) -> None:
            operation.step(
                lambda done, failed: session.link.request(
                    "GET", session.path, None, done, failed
                ),  # fmt: skip
                operation.done,
            )

        self.session(operation, volume_node, axis_index(axis), _guarded(operation, go))
        return operation


def volume_arrays(volume_node) -> tuple[np.ndarray, np.ndarray]:
    """The node's voxels ``(K, J, I)`` (a view, not a copy: the upload reads it a slab
    per tick) and its 4x4 IJK -> world RAS (linear parent transform applied)."""
    import slicer
    import vtk

    from RobustMedSAMHelpers.mrml import _numpy_matrix, _to_world

    if volume_node is None or not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError("select a scalar volume node to segment")
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"volume '{volume_node.GetName()}' holds no image data")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(f"volume '{volume_node.GetName()}' is not a scalar (grey-level) volume")
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVolume(volume_node), _to_world(volume_node) @ _numpy_matrix(matrix)


def _stamp(volume_node) -> tuple:
    """Changes when the voxels (their array is marked modified), the grid or the
    geometry in world RAS change: the session is then re-opened. (The node's own MTime
    also moves for display changes, which the server does not care about.)"""
    array, ijk_to_ras = volume_arrays(volume_node)
    scalars = volume_node.GetImageData().GetPointData().GetScalars()
    return (scalars.GetMTime(), array.shape, tuple(np.round(ijk_to_ras, 9).ravel()))


def _pinned_ijk(session: LinkSession, points_ras: np.ndarray, index: int) -> np.ndarray:
    """``Nx3`` RAS -> continuous ``(i, j, k)`` with the session axis' index set to ``index``."""
    points = np.asarray(points_ras, float).reshape(-1, 3)
    homogeneous = np.c_[points, np.ones(len(points))]
    ijk = (np.linalg.inv(session.ijk_to_ras) @ homogeneous.T).T[:, :3]
    ijk[:, 2 - session.axis] = index
    return ijk


def _check_index(session: LinkSession, index: int) -> None:
    if not 0 <= int(index) < session.n_slices:
        raise InputError(f"slice {index} is outside the volume (0..{session.n_slices - 1})")


def _guarded(operation: Operation, function: Callable[[LinkSession], None]):
    """``function`` with its errors reported as the operation's."""

    def run(session: LinkSession) -> None:
        try:
            function(session)
        except Exception as error:  # noqa: BLE001 - reported through on_error
            operation.fail(error)

    return run


@dataclass
class ServerPrompts:
    """World RAS prompts for ``ServerWork.segment`` (the library's ``VolumePrompts``
    fields, without importing torch): ``positive``/``negative`` ``Nx3`` or None, ``roi``
    a ``Roi`` or None."""

    positive: np.ndarray | None
    negative: np.ndarray | None
    roi: Any = None


def slices_of_points(volume_node, axis, points_ras) -> np.ndarray:
    """The slice index along ``axis`` holding each ``Nx3`` world RAS point (nearest)."""
    _, ijk_to_ras = volume_arrays(volume_node)
    points = np.asarray(points_ras, float).reshape(-1, 3)
    ijk = (np.linalg.inv(ijk_to_ras) @ np.c_[points, np.ones(len(points))].T).T
    return np.rint(ijk[:, 2 - axis_index(axis)]).astype(int)


def slice_of_point(volume_node, axis, point_ras) -> int:
    """The slice along ``axis`` holding a world RAS point; InputError outside the volume."""
    array, ijk_to_ras = volume_arrays(volume_node)
    ijk = (np.linalg.inv(ijk_to_ras) @ np.r_[np.asarray(point_ras, float).reshape(3), 1.0])[:3]
    kji = np.rint(ijk[::-1]).astype(int)
    if ((kji < 0) | (kji >= np.array(array.shape))).any():
        raise InputError(
            f"the point at RAS {np.round(point_ras, 1).tolist()} lies outside volume "
            f"'{volume_node.GetName()}'"
        )
    return int(kji[axis_index(axis)])


def slice_centre_ras(volume_node, axis, index: int) -> np.ndarray:
    """World RAS ``(3,)`` of the centre of slice ``index`` along ``axis``."""
    array, ijk_to_ras = volume_arrays(volume_node)
    centre_kji = (np.array(array.shape, float) - 1) / 2
    centre_kji[axis_index(axis)] = index
    return (ijk_to_ras @ np.r_[centre_kji[::-1], 1.0])[:3]


def slice_scores(record: dict) -> list:
    """A run record's per-slice scores as objects (``index``, ``score`` and ``overlap``
    (NaN when none: a slice interpolated, not asked, has neither), ``area``, ``source``),
    as the confidence table reads them."""
    import math
    import types

    def number(value) -> float:
        return math.nan if value is None else float(value)

    rows = []
    for s in record.get("slices", []):
        rows.append(types.SimpleNamespace(
            index=int(s["index"]), score=number(s["score"]), overlap=number(s.get("overlap")),
            area=int(s.get("area", 0)), source=s.get("source", ""),
        ))  # fmt: skip
    return rows
