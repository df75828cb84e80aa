"""The inference server's HTTP application (FastAPI), protocol version 1.

Every request carries ``Authorization: Bearer TOKEN`` (checked in constant time by
``Guard`` before any body is read, with the body size limits). Sessions are tied to the
token that opened them. Frames: points are RAS mm or continuous IJK voxel indices
(``frame``); slices are indices along the session's axis; masks travel as protocol
patches (KJI). Model work runs on worker threads; nothing a client sends names a file
or code on the server. The endpoints are listed in ``docs/server.md``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from RobustMedSAMLib import __version__
from RobustMedSAMLib.errors import InputError, RobustMedSAMError
from RobustMedSAMLib.formats.markups import Roi
from RobustMedSAMLib.formats.volume import Volume
from RobustMedSAMLib.inference.propagation import plan_order, propagate
from RobustMedSAMLib.inference.segment_volume import (
    SegmentOptions,
    VolumePrompts,
    model_projection,
    run_record,
    segment_volume,
    windowed_slice,
)
from RobustMedSAMLib.inference.session import SegmentationSession
from RobustMedSAMLib.inference.slicing import get_slice, ijk_box_roi, ras_to_slice_points, set_slice
from RobustMedSAMLib.server.bodies import (
    ClickRequest,
    EncodeRequest,
    MaskRequest,
    PropagateRequest,
    SegmentRequest,
)
from RobustMedSAMLib.server.guard import Guard, MiB
from RobustMedSAMLib.server.protocol import (
    PROTOCOL_VERSION,
    VOLUME_MEDIA_TYPE,
    decode_patch,
    encode_patch,
    unpack_volume,
)
from RobustMedSAMLib.server.sessions import (
    Job,
    ServerSession,
    SessionStore,
    check_slice,
    error_body,
)

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    """Limits and the accepted tokens (one per client or user)."""

    tokens: list[str]
    max_sessions: int = 8
    max_memory_bytes: int = 16 * 1024 * MiB
    max_upload_bytes: int = 1024 * MiB
    max_request_bytes: int = 16 * MiB
    max_voxels: int = 2**31 - 1
    idle_seconds: float = 900.0
    cache_bytes: int = 1024 * MiB
    max_wait_seconds: float = 10.0


@dataclass
class ServedModel:
    """The model the server runs: a predictor factory (one predictor per session, one
    shared network), the record's model entry and the ``/v1/models`` facts."""

    name: str
    make_predictor: Any
    info: dict[str, Any]
    input_size: int | None
    model_id: str = ""
    catalogue: list[dict[str, Any]] = field(default_factory=list)


# --- the application -------------------------------------------------------------------


def create_app(config: ServerConfig, served: ServedModel) -> FastAPI:
    """The FastAPI app; ``app.state.store`` holds the sessions (reaper started)."""
    app = FastAPI(
        title="RobustMedSAM inference server",
        version=str(PROTOCOL_VERSION),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    store = SessionStore(config.max_sessions, config.max_memory_bytes, config.idle_seconds)
    store.start_reaper()
    app.state.store = store
    app.add_middleware(Guard, config=config)

    @app.exception_handler(RobustMedSAMError)
    async def library_error(request: Request, error: RobustMedSAMError):
        status, body = error_body(error)
        return JSONResponse(body, status)

    @app.exception_handler(torch.OutOfMemoryError)
    @app.exception_handler(MemoryError)
    async def out_of_memory(request: Request, error: Exception):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        status, body = error_body(error)
        return JSONResponse(body, status)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, error: RequestValidationError):
        return JSONResponse({"error": "malformed", "detail": _malformed(error)}, 422)

    @app.exception_handler(HTTPException)
    async def routing_error(request: Request, error: HTTPException):
        status, body = _http_error(request, error)
        return JSONResponse(body, status, headers=error.headers)

    def session_of(request: Request, session_id: str) -> ServerSession:
        return store.get(session_id, request.state.owner)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "protocol": PROTOCOL_VERSION,
            "version": __version__,
            "model": served.name,
            "device": served.info.get("device"),
            "precision": served.info.get("precision", "float32"),
            "engine": served.info.get("engine", "eager"),
            "sessions": len(store),
            "max_upload_bytes": config.max_upload_bytes,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"served": served.name, "models": served.catalogue}

    @app.post("/v1/sessions", status_code=201)
    async def open_session(request: Request) -> dict[str, Any]:
        if request.headers.get("content-type", "").split(";")[0] != VOLUME_MEDIA_TYPE:
            return JSONResponse(
                {"error": "media_type", "detail": f"send the volume as {VOLUME_MEDIA_TYPE}"}, 415
            )
        body = await request.body()
        return await run_in_threadpool(_open, body, request.state.owner)

    def _open(body: bytes, owner: str) -> dict[str, Any]:
        header, voxels = unpack_volume(body, config.max_voxels)
        if header.model not in (None, served.name):
            from RobustMedSAMLib.weights.registry import get_source

            get_source(header.model)  # InputError for an unknown name
            raise InputError(
                f"model {header.model!r} is not served here; this server serves "
                f"{served.name!r} (GET /v1/models)"
            )
        try:
            volume = Volume(voxels, np.asarray(header.ijk_to_ras, float), str(header.name))
        except ValueError as error:
            raise InputError(f"malformed volume upload: ijk_to_ras: {error}") from None
        window = tuple(float(v) for v in header.window) if header.window else None
        segmentation = SegmentationSession(
            volume,
            served.make_predictor(),
            header.axis,
            window,
            cache_bytes=config.cache_bytes,
            model_id=served.model_id,
        )
        session = store.add(owner, segmentation)
        log.info(
            "session %s...: %s voxels, axis %d", session.id[:6], volume.shape, segmentation.axis
        )
        return {
            "session": session.id,
            "shape": list(volume.shape),
            "axis": segmentation.axis,
            "n_slices": segmentation.n_slices,
            "window": list(segmentation.window),
            "model": served.name,
            "protocol": PROTOCOL_VERSION,
        }

    @app.get("/v1/sessions/{session_id}")
    def describe(request: Request, session_id: str) -> dict[str, Any]:
        session = session_of(request, session_id)
        seg = session.segmentation
        return {"session": session.id, "n_slices": seg.n_slices, "axis": seg.axis,
                "encoded": len(set(seg.stats.encoded)), "busy": session.busy}  # fmt: skip

    @app.delete("/v1/sessions/{session_id}", status_code=204)
    def close(request: Request, session_id: str) -> Response:
        store.close(session_id, request.state.owner)
        return Response(status_code=204)

    @app.post("/v1/sessions/{session_id}/click")
    def click(request: Request, session_id: str, body: ClickRequest) -> dict[str, Any]:
        session = session_of(request, session_id)
        if session.busy:
            raise_busy(session)
        ras = _to_ras(session, [body.point], body.frame)
        seg = session.segmentation
        kind = "point" if body.positive else "negative point"
        indices, xy = ras_to_slice_points(seg.volume, seg.axis, ras, kind)
        index = int(indices[0])
        with session.lock:
            prediction = seg.click(index, tuple(xy[0]), body.positive)
            patch = session.change_slice(index, prediction.mask, click=True)
        return {"slice": index, "score": prediction.score, "patch": patch}

    @app.post("/v1/sessions/{session_id}/segment", status_code=202)
    def segment(request: Request, session_id: str, body: SegmentRequest) -> dict[str, Any]:
        session = session_of(request, session_id)
        prompts = _prompts(session, body)
        sent = body.options
        options = SegmentOptions(body.propagate, sent.propagation(), sent.zoom,
                                 seed_box_growth=sent.seed_box_growth)  # fmt: skip
        options.validate()

        def work(job: Job) -> dict[str, Any]:
            seg = session.segmentation
            result = segment_volume(seg, prompts, options, job.progress, job.cancel)
            job.check_cancelled()
            patch = session.change(result.mask)
            inputs = {
                "volume": seg.volume.name,
                "axis": seg.axis,
                "window": list(seg.window),
                "server": True,
            }
            record = run_record(result, prompts, options, served.info, inputs)
            return {"patch": patch, "record": record}

        return session.start_job("segment", work).view()

    @app.post("/v1/sessions/{session_id}/propagate", status_code=202)
    def propagate_seeds(request: Request, session_id: str, body: PropagateRequest):
        session = session_of(request, session_id)
        seg = session.segmentation
        seeds = {check_slice(session, z): get_slice(session.mask, seg.axis, z) for z in body.seeds}
        if not all(mask.any() for mask in seeds.values()):
            empty = [z for z, mask in seeds.items() if not mask.any()]
            raise InputError(f"seed slice(s) {empty} have an empty mask: click or send a mask")
        options = model_projection(body.options.propagation(), seg.predictor)  # as segment
        options.validate()

        def work(job: Job) -> dict[str, Any]:
            logits = {z: seg.click_logits(z) for z in seeds}
            logits = {z: v for z, v in logits.items() if v is not None}
            order = plan_order(seeds, seg.n_slices, options.bounds, options.max_slices,
                               options.slice_step)  # fmt: skip
            with seg.encoding_ahead(order):  # the encoder runs while a slice decodes
                result = propagate(
                    seg,
                    seeds,
                    options,
                    job.progress,
                    job.cancel,
                    logits,
                    images=lambda index: windowed_slice(seg, index),
                    features=seg.mask_features,
                )
            job.check_cancelled()
            new = session.mask.copy()
            asked = [r.index for r in result.records if r.direction != 0]
            for index in asked + result.filled:  # filled: interpolated (slice_step > 1)
                set_slice(new, seg.axis, index, result.mask[index])
            stops = [
                {
                    "seed": s.seed,
                    "direction": s.direction,
                    "last_index": s.last_index,
                    "reason": s.reason,
                }
                for s in result.stops
            ]
            return {"patch": session.change(new), "stops": stops,
                    "projection": options.projection,
                    "filled": list(result.filled)}  # fmt: skip

        return session.start_job("propagate", work).view()

    @app.get("/v1/sessions/{session_id}/job")
    def job_state(request: Request, session_id: str, wait: float = 0.0) -> dict[str, Any]:
        session = session_of(request, session_id)
        if session.job is None:
            raise InputError("no job was started in this session")
        session.waiting += 1
        try:
            session.job.wait(min(max(wait, 0.0), config.max_wait_seconds))
        finally:
            session.waiting -= 1
            session.touch()
        return session.job.view()

    @app.post("/v1/sessions/{session_id}/cancel", status_code=202)
    def cancel(request: Request, session_id: str) -> dict[str, Any]:
        session = session_of(request, session_id)
        session.stop_encoding()
        if session.job is not None:
            session.job.cancel.set()
        return {"cancelling": session.busy}

    @app.post("/v1/sessions/{session_id}/encode", status_code=202)
    def encode(request: Request, session_id: str, body: EncodeRequest) -> dict[str, Any]:
        session = session_of(request, session_id)
        for z in body.seeds:
            check_slice(session, z)
        return {"queued": session.encode_ahead(body.seeds, body.bounds, body.slice_step)}

    @app.post("/v1/sessions/{session_id}/mask")
    def set_mask(request: Request, session_id: str, body: MaskRequest) -> dict[str, Any]:
        session = session_of(request, session_id)
        if session.busy:
            raise_busy(session)
        extent, block = decode_patch(body.patch, session.mask.shape)
        with session.lock:
            return {"patch": session.change_region(extent, block)}

    @app.get("/v1/sessions/{session_id}/mask")
    def get_mask(request: Request, session_id: str) -> dict[str, Any]:
        session = session_of(request, session_id)
        if session.busy:  # the job holds the lock: this request would wait for its end
            raise_busy(session)
        with session.lock:
            whole = tuple(slice(0, n) for n in session.mask.shape)
            return {"patch": encode_patch(session.mask, whole)}

    @app.post("/v1/sessions/{session_id}/undo")
    def undo(request: Request, session_id: str) -> dict[str, Any]:
        session = session_of(request, session_id)
        if session.busy:
            raise_busy(session)
        with session.lock:
            undone, patch = session.undo()
        return {"undone": undone, "patch": patch}

    return app


def _malformed(error: RequestValidationError) -> str:
    """The one-line detail of a 422: where the body is wrong and how."""
    first = error.errors()[0] if error.errors() else {"loc": (), "msg": "invalid"}
    if first.get("type") == "json_invalid":  # loc: ("body", character position)
        why = first.get("ctx", {}).get("error", "invalid")
        return f"malformed request: the body is not JSON ({why}, at character {first['loc'][-1]})"
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return f"malformed request: {where}: {first.get('msg')}"


def _http_error(request: Request, error: HTTPException) -> tuple[int, dict[str, str]]:
    """FastAPI's own refusals (no such path or method, a body it cannot parse) in the
    protocol's ``{"error", "detail"}`` form; an unparsable body is 422 ``malformed``."""
    what = f"{request.method} {request.url.path[:200]}"
    if error.status_code == 404:
        return 404, {"error": "not_found", "detail": f"no endpoint {what} (docs/server.md)"}
    if error.status_code == 405:
        return 405, {"error": "method", "detail": f"{what} is not allowed (docs/server.md)"}
    if error.status_code == 400:
        cause = error.__cause__
        why = "nested too deeply" if isinstance(cause, RecursionError) else str(cause)
        return 422, {
            "error": "malformed",
            "detail": f"malformed request: the body is not JSON ({why})",
        }
    return error.status_code, {"error": "http", "detail": str(error.detail)}


def raise_busy(session: ServerSession) -> None:
    from RobustMedSAMLib.server.sessions import BusyError

    raise BusyError(f"a {session.job.kind} is running in this session: wait for it or cancel it")


def _to_ras(session: ServerSession, points, frame: str) -> np.ndarray:
    """``Nx3`` points in ``frame`` ("ras" mm or "ijk" voxel indices) as RAS mm."""
    points = np.asarray(points, float).reshape(-1, 3)
    if frame == "ijk":
        return session.segmentation.volume.ijk_to_ras_points(points)
    return points


def _prompts(session: ServerSession, body: SegmentRequest) -> VolumePrompts:
    """The request's points and box as in-process ``VolumePrompts`` (RAS)."""
    volume = session.segmentation.volume
    roi = None
    if body.box is not None:
        box = body.box
        if body.frame == "ijk":
            if box.low is None or box.high is None:
                raise InputError("an IJK box needs 'low' and 'high' corners")
            roi = ijk_box_roi(volume, box.low, box.high)
        else:
            if box.center is None or box.size is None:
                raise InputError("a RAS box needs 'center' and 'size' (and optionally 'axes')")
            axes = np.eye(3) if box.axes is None else np.asarray(box.axes, float)
            roi = Roi(np.asarray(box.center, float), np.asarray(box.size, float), axes)
    positive = None if not body.positive else _to_ras(session, body.positive, body.frame)
    negative = None if not body.negative else _to_ras(session, body.negative, body.frame)
    if positive is None and roi is None:
        raise InputError("no prompt: give at least one positive point or a box")
    return VolumePrompts(positive, negative, roi)


def _input_size(architecture: str) -> int:
    """The model's square input side: the lite models 256, the ViT-B models 1024."""
    return 256 if architecture in ("litemedsam", "robustmedsam-lite") else 1024


def model_catalogue(
    served_name: str, input_size: int | None, engine: str = "eager"
) -> list[dict[str, Any]]:
    """``/v1/models``: every known model, its prompt types and input size, the engines it
    can run on and the one it runs on here (None when not served), and which one this
    server runs (the others are listed so a client can say what to start)."""
    from RobustMedSAMLib.names import ENGINES
    from RobustMedSAMLib.weights.registry import MODELS

    out = []
    for name, source in MODELS.items():
        size = input_size if name == served_name else _input_size(source.architecture)
        out.append(
            {
                "name": name,
                "served": name == served_name,
                "description": source.description,
                "preprocessing": source.preprocessing,
                "input_size": size,
                "engine": engine if name == served_name else None,
                "engines": list(ENGINES) if _input_size(source.architecture) == 256 else ["eager"],
                "prompts": ["point", "box", "mask"],
                "frames": ["ras", "ijk"],
            }
        )
    return out
