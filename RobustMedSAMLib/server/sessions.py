"""The server's sessions: one volume and one ``SegmentationSession`` each, the current
3D mask, an undo stack, at most one long job; all held in a bounded LRU store whose
idle sessions expire.

Every mask change goes through ``ServerSession.change`` so that the answer is always
the changed extent (a protocol patch) and the undo stack can restore it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from RobustMedSAMLib.errors import CancelledError, InputError, RobustMedSAMError
from RobustMedSAMLib.inference.propagation import plan_order
from RobustMedSAMLib.inference.session import SegmentationSession
from RobustMedSAMLib.inference.slicing import get_slice
from RobustMedSAMLib.server.protocol import changed_extent, encode_patch

log = logging.getLogger(__name__)
UNDO_STEPS = 20
EXPIRED_REMEMBERED = 1000


class SessionGoneError(RobustMedSAMError):
    """The session does not exist for this token, or expired (``expired`` True)."""

    def __init__(self, message: str, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


class BusyError(RobustMedSAMError):
    """A long job is already running in the session."""


class ServerFullError(RobustMedSAMError):
    """No room for another session: every session held is running a job."""


@dataclass
class Job:
    """A propagation / segmentation running on a worker thread. state: running, done,
    failed or cancelled; ``done``/``total`` slices; result or error once finished."""

    kind: str
    state: str = "running"
    done: int = 0
    total: int = 0
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    updated: threading.Condition = field(default_factory=threading.Condition)

    def progress(self, done: int, total: int) -> None:
        """Count slices; waiters are not woken (a poll per slice would slow the job)."""
        with self.updated:
            self.done, self.total = done, total

    def check_cancelled(self) -> None:
        """CancelledError if a cancel was asked: called before the result is applied, so
        a job cancelled after the model's last check (or in a step without one, such as
        a segment without propagation) still changes nothing."""
        if self.cancel.is_set():
            raise CancelledError(f"{self.kind} cancelled; no mask was changed")

    def finish(self, state: str, result=None, error=None) -> None:
        with self.updated:
            self.state, self.result, self.error = state, result, error
            self.updated.notify_all()

    def wait(self, seconds: float) -> None:
        """Return when the job ends or after ``seconds``."""
        with self.updated:
            if self.state == "running":
                self.updated.wait(seconds)

    def view(self) -> dict[str, Any]:
        with self.updated:
            return {
                "kind": self.kind,
                "state": self.state,
                "done": self.done,
                "total": self.total,
                "result": self.result,
                "error": self.error,
            }


@dataclass
class _Undo:
    """What one interaction replaced: the mask in ``extent`` before it (None: nothing
    changed), and the slice of a click (undone through the session's own click undo)."""

    extent: tuple[slice, ...] | None
    before: np.ndarray | None
    click_slice: int | None = None


class ServerSession:
    """One client's volume on the server. ``lock`` serialises model work on it."""

    def __init__(self, session_id: str, owner: str, segmentation: SegmentationSession) -> None:
        self.id, self.owner, self.segmentation = session_id, owner, segmentation
        self.mask = np.zeros(segmentation.volume.shape, dtype=bool)
        self.lock = threading.RLock()
        self._job_lock = threading.Lock()
        self.last_seen = time.monotonic()
        self.job: Job | None = None
        self.waiting = 0  # requests long-polling the job now: the client is there
        self._undo: list[_Undo] = []
        self._encode_stop = threading.Event()

    @property
    def nbytes(self) -> int:
        """Memory reserved: voxels, mask and the embeddings (see :func:`reserved_bytes`)."""
        return reserved_bytes(self.segmentation)

    @property
    def busy(self) -> bool:
        return self.job is not None and self.job.state == "running"

    def touch(self) -> None:
        self.last_seen = time.monotonic()

    def change(self, new_mask: np.ndarray) -> dict | None:
        """Make ``new_mask`` ``(K, J, I)`` current; push the undo step; the changed patch."""
        return self.change_region(tuple(slice(0, n) for n in self.mask.shape), new_mask)

    def change_region(
        self, extent: tuple[slice, ...], block: np.ndarray, click_slice: int | None = None
    ) -> dict | None:
        """Write ``block`` into ``mask[extent]`` (KJI box); only what differs is patched and
        saved for undo, so a click costs its slice, not a copy of the volume."""
        inner = changed_extent(self.mask[extent], block)
        if inner is None:
            self._push_undo(_Undo(None, None, click_slice))
            return None
        changed = tuple(slice(o.start + i.start, o.start + i.stop)
                        for o, i in zip(extent, inner, strict=True))  # fmt: skip
        self._push_undo(_Undo(changed, self.mask[changed].copy(), click_slice))
        self.mask[changed] = block[inner]
        if click_slice is None:
            self._forget_clicks(changed[self.segmentation.axis])
        return encode_patch(self.mask, changed)

    def change_slice(self, index: int, slice_mask: np.ndarray, click: bool = False) -> dict | None:
        """Replace slice ``index`` (along the session's axis) with ``(rows, cols)`` mask."""
        extent, block = self._slice_region(index, slice_mask)
        return self.change_region(extent, block, index if click else None)

    def _slice_region(self, index: int, slice_mask: np.ndarray) -> tuple[tuple, np.ndarray]:
        axis = self.segmentation.axis
        extent = [slice(0, n) for n in self.mask.shape]
        extent[axis] = slice(index, index + 1)
        return tuple(extent), np.expand_dims(np.asarray(slice_mask, bool), axis)

    def _push_undo(self, step: _Undo) -> None:
        self._undo = [*self._undo[-(UNDO_STEPS - 1) :], step]

    def _forget_clicks(self, indices: slice) -> None:
        """Slices changed by anything but a click lose their points and logits: the
        next click there starts afresh, and propagation takes no stale logits."""
        for index in range(indices.start, indices.stop):
            self.segmentation.clear_clicks(index)

    def undo(self) -> tuple[bool, dict | None]:
        """Undo the last interaction: ``(undone, patch)``. A click is undone as the
        in-process ``undo_click`` does (re-predicted from the points left)."""
        if not self._undo:
            return False, None
        step = self._undo.pop()
        if step.click_slice is not None:
            prediction = self.segmentation.undo_click(step.click_slice)
            shape = get_slice(self.mask, self.segmentation.axis, step.click_slice).shape
            slice_mask = np.zeros(shape, bool) if prediction is None else prediction.mask
            extent, block = self._slice_region(step.click_slice, slice_mask)
        elif step.extent is not None:
            extent, block = step.extent, step.before
        else:
            return True, None
        inner = changed_extent(self.mask[extent], block)
        if inner is None:
            return True, None
        changed = tuple(slice(o.start + i.start, o.start + i.stop)
                        for o, i in zip(extent, inner, strict=True))  # fmt: skip
        self.mask[changed] = block[inner]
        return True, encode_patch(self.mask, changed)

    def start_job(self, kind: str, work: Callable[[Job], dict[str, Any]]) -> Job:
        """Run ``work(job)`` on a thread (under the session lock); BusyError if one runs."""
        with self._job_lock:  # two requests must not both start one
            if self.busy:
                raise BusyError(f"a {self.job.kind} is already running in this session: cancel it")
            job = self.job = Job(kind)
        self.stop_encoding()
        threading.Thread(target=self._run_job, args=(job, work), daemon=True).start()
        return job

    def _run_job(self, job: Job, work: Callable[[Job], dict[str, Any]]) -> None:
        try:
            with self.lock:
                result = work(job)
            job.finish("done", result)
        except CancelledError as error:
            job.finish("cancelled", error={"error": "cancelled", "detail": str(error)})
        except Exception as error:  # noqa: BLE001 - reported to the client, server goes on
            job.finish("failed", error=error_body(error)[1])

    def encode_ahead(
        self, seeds: list[int], bounds: tuple[int, int] | None = None, step: int = 1
    ) -> int:
        """Encode slices on a thread in propagation order from ``seeds``, every ``step``-th
        (the ``slice_step`` propagation will ask with), as many as the embedding cache
        holds; a new request or a job stops it. Returns the count queued."""
        self.stop_encoding()
        order = [s for s in seeds if 0 <= s < self.segmentation.n_slices]
        order = order + plan_order(seeds, self.segmentation.n_slices, bounds, step=step)
        stop = self._encode_stop = threading.Event()
        threading.Thread(target=self._encode, args=(order, stop), daemon=True).start()
        return len(order)

    def _encode(self, order: list[int], stop: threading.Event) -> None:
        segmentation, capacity = self.segmentation, None
        for count, index in enumerate(order):
            if stop.is_set() or (capacity is not None and count >= capacity):
                return
            with self.lock:
                try:
                    encoded = segmentation.encoded(index)
                except RobustMedSAMError as error:
                    log.warning("encode-ahead of slice %d stopped: %s", index, error)
                    return
            if capacity is None:
                capacity = max(1, segmentation.cache_bytes // max(1, encoded.features.nbytes))

    def stop_encoding(self) -> None:
        self._encode_stop.set()

    def close(self) -> None:
        self.stop_encoding()
        if self.job is not None:
            self.job.cancel.set()


def reserved_bytes(segmentation: SegmentationSession) -> int:
    """Voxels + a bool mask + the most a session's embeddings can take: its cache budget
    and the newest slice each of its kept crops holds beyond it
    (``SegmentationSession.max_cached_bytes``)."""
    array = segmentation.volume.array
    return array.nbytes + array.size + segmentation.max_cached_bytes()


def error_body(error: BaseException) -> tuple[int, dict[str, str]]:
    """HTTP status and ``{"error": kind, "detail": one line}`` for an exception."""
    from RobustMedSAMLib.errors import CheckpointError, ModelOutOfMemoryError

    kinds = (
        (SessionGoneError, 404, "not_found"),
        (BusyError, 409, "busy"),
        (ServerFullError, 503, "full"),
        (ModelOutOfMemoryError, 503, "out_of_memory"),
        (CancelledError, 409, "cancelled"),
        (InputError, 400, "input"),
        (CheckpointError, 500, "checkpoint"),
    )
    if isinstance(error, SessionGoneError) and error.expired:
        return 410, {"error": "expired", "detail": str(error)}
    for kind, status, name in kinds:
        if isinstance(error, kind):
            return status, {"error": name, "detail": str(error)}
    if _is_out_of_memory(error):
        return 503, {"error": "out_of_memory", "detail": f"out of memory on the server: {error}"}
    log.exception("unexpected error", exc_info=error)
    return 500, {"error": "internal", "detail": f"{type(error).__name__}: {error}"}


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError | MemoryError)


def owner_of(token: str) -> str:
    """The stored identity of a token (its SHA-256), never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


class SessionStore:
    """Sessions by unguessable ID, each tied to the token that opened it. Bounded in
    count and memory (least recently used idle sessions are evicted to make room);
    sessions idle for ``idle_seconds`` expire (their job is cancelled)."""

    def __init__(self, max_sessions: int, max_bytes: int, idle_seconds: float) -> None:
        self.max_sessions, self.max_bytes, self.idle_seconds = max_sessions, max_bytes, idle_seconds
        self._sessions: OrderedDict[str, ServerSession] = OrderedDict()
        self._gone: OrderedDict[str, tuple[str, str]] = OrderedDict()  # id -> (owner, why)
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def __len__(self) -> int:
        return len(self._sessions)

    def add(self, owner: str, segmentation: SegmentationSession) -> ServerSession:
        """A new session; evicts idle LRU sessions for room, BusyError when none can go."""
        incoming = reserved_bytes(segmentation)
        with self._lock:
            for session in list(self._sessions.values()):
                if len(self._sessions) < self.max_sessions and (
                    self._bytes() + incoming <= self.max_bytes
                ):
                    break
                if not session.busy:
                    self._drop(session, "was closed to make room for a newer session")
            if (
                len(self._sessions) >= self.max_sessions
                or self._bytes() + incoming > self.max_bytes
            ):
                raise ServerFullError(
                    f"the server is full ({len(self._sessions)} sessions running jobs, "
                    f"{self._bytes() // 2**20} MB): retry later or close a session"
                )
            session = ServerSession(secrets.token_urlsafe(24), owner, segmentation)
            self._sessions[session.id] = session
            return session

    def get(self, session_id: str, owner: str) -> ServerSession:
        """The session if ``owner`` opened it; SessionGoneError otherwise (404 / 410)."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and hmac.compare_digest(session.owner, owner):
                self._sessions.move_to_end(session_id)
                session.touch()
                return session
            gone = self._gone.get(session_id)
        if gone is not None and hmac.compare_digest(gone[0], owner):
            raise SessionGoneError(f"session {session_id} {gone[1]}: open a new one", expired=True)
        raise SessionGoneError(f"no session {session_id} for this token (closed or never opened)")

    def close(self, session_id: str, owner: str) -> None:
        session = self.get(session_id, owner)
        with self._lock:
            self._drop(session, "was closed", remember=False)

    def expire_idle(self) -> int:
        """Drop sessions idle for longer than ``idle_seconds``; the count dropped."""
        limit = time.monotonic() - self.idle_seconds
        with self._lock:
            idle = [s for s in self._sessions.values() if s.last_seen < limit and not s.waiting]
            for session in idle:
                why = f"expired after {self.idle_seconds:g} s without a request"
                self._drop(session, why)
        for session in idle:
            log.info("session %s...: %s", session.id[:6], "expired")
        return len(idle)

    def start_reaper(self) -> None:
        """Expire idle sessions from a daemon thread until ``stop``."""
        interval = max(0.05, min(5.0, self.idle_seconds / 4))

        def loop() -> None:
            while not self._stop.wait(interval):
                self.expire_idle()

        threading.Thread(target=loop, daemon=True, name="session-reaper").start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for session in list(self._sessions.values()):
                self._drop(session, "was closed (server stopped)")

    def _bytes(self) -> int:
        return sum(s.nbytes for s in self._sessions.values())

    def _drop(self, session: ServerSession, why: str, remember: bool = True) -> None:
        session.close()
        self._sessions.pop(session.id, None)
        if remember:
            self._gone[session.id] = (session.owner, why)
            while len(self._gone) > EXPIRED_REMEMBERED:
                self._gone.popitem(last=False)


def check_slice(session: ServerSession, index: int) -> int:
    if not 0 <= index < session.segmentation.n_slices:
        raise InputError(f"slice {index} is outside 0..{session.segmentation.n_slices - 1}")
    return index
