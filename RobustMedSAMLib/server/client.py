"""A client for ``robustmedsam serve``: stdlib HTTP + numpy, no torch import, so it runs
in Slicer's Python or any script without PyTorch.

    client = ServerClient("http://127.0.0.1:8765", token)
    session = client.open_session(volume.array, volume.ijk_to_ras, axis="axial")
    answer = session.click([12.0, -30.5, 40.0])           # RAS mm; session.mask updated
    session.segment(positive=points_ras, propagate=True)  # a job: progress, cancel
    session.undo(); session.close()

Frames: ``session.mask`` is the current ``(K, J, I)`` bool mask, kept equal to the
server's by applying each answer's patch (the changed extent only). Points are RAS mm
(``frame="ras"``) or continuous IJK indices (``frame="ijk"``).
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from RobustMedSAMLib.errors import CancelledError, InputError, ServerError
from RobustMedSAMLib.server.protocol import (
    PROTOCOL_VERSION,
    VOLUME_MEDIA_TYPE,
    OpenedSession,
    VolumeHeader,
    apply_patch,
    box_body,
    error_for,
    pack_volume,
    parse_answer,
    points_body,
)

TOKEN_ENV = "ROBUSTMEDSAM_TOKEN"
_IDLE_RECONNECT_S = 4.0  # reopen a keep-alive connection idle longer than the server keeps it
POLL_SECONDS = 0.5  # a job's progress is reported this often; its end at once
Progress = Callable[[int, int], None]


@dataclass
class SliceAnswer:
    """A click's answer: the slice (index along the session axis) and predicted IoU."""

    slice: int
    score: float


class ServerClient:
    """Talks to one server. ``timeout``: seconds to wait for any single answer."""

    def __init__(
        self, url: str, token: str, timeout: float = 120.0, cafile: str | None = None
    ) -> None:
        """``cafile``: PEM certificates to trust for ``https`` besides the system's (a
        hospital CA, or a self-signed server certificate)."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"server URL {url!r} is not http://HOST:PORT or https://HOST:PORT")
        self.url, self.token, self.timeout = url.rstrip("/"), token.strip(), timeout
        self.cafile = None if cafile is None else str(cafile)
        self._parts = parts
        self._prefix = parts.path.rstrip("/")
        self._local = threading.local()

    # --- plumbing ----------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or time.monotonic() - local.used > _IDLE_RECONNECT_S:
            if conn is not None:
                conn.close()
            host, port = self._parts.hostname, self._parts.port
            if self._parts.scheme == "https":
                context = ssl.create_default_context(cafile=self.cafile)
                conn = http.client.HTTPSConnection(host, port, timeout=self.timeout,
                                                   context=context)  # fmt: skip
            else:
                conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
            local.conn = conn
        return conn

    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | bytes | None = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """One request; the JSON answer. Errors: InputError (400/422/413: the request),
        ModelOutOfMemoryError (503 OOM), ServerError (anything else, or no answer)."""
        headers = {"Authorization": f"Bearer {self.token}"}
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = content_type
        else:
            data = None
        conn = self._connection()
        conn.timeout = timeout or self.timeout
        if conn.sock is not None:
            conn.sock.settimeout(conn.timeout)
        try:
            conn.request(method, self._prefix + path, body=data, headers=headers)
            response = conn.getresponse()
            payload = response.read()
        except ssl.SSLError as error:
            conn.close()
            self._local.conn = None
            raise ServerError(
                f"TLS with {self.url} failed ({error}); if the server's certificate is from "
                "your own CA or self-signed, give that certificate (cafile)"
            ) from None
        except (OSError, http.client.HTTPException) as error:
            conn.close()
            self._local.conn = None
            raise ServerError(
                f"the server at {self.url} stopped answering ({type(error).__name__}: "
                f"{error}); check that it is running — nothing was written"
            ) from None
        self._local.used = time.monotonic()
        return parse_answer(response.status, payload, f"{method} {path}", self.url)

    # --- the protocol ------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``{"status": "ok", "protocol", "version", "model", "device", "sessions"}``."""
        answer = self.request("GET", "/health")
        if answer.get("protocol") != PROTOCOL_VERSION:
            raise ServerError(
                f"the server at {self.url} speaks protocol {answer.get('protocol')}, this "
                f"client {PROTOCOL_VERSION}: use the same robustmedsam version on both sides"
            )
        return answer

    def models(self) -> dict[str, Any]:
        """``{"served": name, "models": [{name, served, input_size, prompts, ...}]}``."""
        return self.request("GET", "/v1/models")

    def open_session(
        self,
        array: np.ndarray,
        ijk_to_ras: np.ndarray,
        axis: str | int = "axial",
        window: Sequence[float] | None = None,
        model: str | None = None,
        name: str = "volume",
    ) -> RemoteSession:
        """Send a ``(K, J, I)`` volume with its 4x4 IJK-to-RAS matrix; a session on it.
        ``model``: refuse unless the server runs this model (None: any)."""
        header = VolumeHeader(
            tuple(np.shape(array)),
            str(np.asarray(array).dtype),
            np.asarray(ijk_to_ras, float).tolist(),
            axis,
            None if window is None else tuple(float(v) for v in window),
            model,
            name,
        )
        body = pack_volume(np.asarray(array), header)
        limit = self.health().get("max_upload_bytes")
        if limit is not None and len(body) > limit:  # refused before sending it all
            raise InputError(
                f"volume '{name}' is {len(body) / 2**20:.1f} MB compressed; the server at "
                f"{self.url} takes at most {limit / 2**20:.1f} MB (serve --max-upload-mb)"
            )
        answer = self.request("POST", "/v1/sessions", body, VOLUME_MEDIA_TYPE)
        return RemoteSession(self, answer)


class RemoteSession(OpenedSession):
    """A session on the server: one volume, its current mask, undo, jobs."""

    def __init__(self, client: ServerClient, opened: dict[str, Any]) -> None:
        super().__init__(opened)
        self.client = client
        self.filled: list[int] = []  # the last propagate's interpolated slices

    def _post(self, action: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.client.request("POST", f"{self.path}/{action}", body or {})

    def click(self, point: Sequence[float], positive: bool = True, frame: str = "ras"):
        """Add an include (exclude) point; the clicked slice's mask is refined with all
        points so far, as the in-process session's ``click``. Returns a SliceAnswer."""
        answer = self._post(
            "click",
            {
                "point": np.asarray(point, float).reshape(3).tolist(),
                "frame": frame,
                "positive": bool(positive),
            },
        )
        apply_patch(self.mask, answer["patch"])
        return SliceAnswer(answer["slice"], answer["score"])

    def segment(
        self,
        positive: np.ndarray | None = None,
        negative: np.ndarray | None = None,
        box: dict[str, Any] | Any | None = None,
        propagate: bool = False,
        options: dict[str, Any] | None = None,
        frame: str = "ras",
        progress: Progress | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        """``segment_volume`` on the server: points ``Nx3`` in ``frame``, ``box`` a RAS
        ``Roi`` (or ``{"center", "size", "axes"}``; IJK: ``{"low", "high"}``). The mask
        becomes the result; returns the run record, as the CLI writes it."""
        body = {
            "frame": frame,
            "positive": points_body(positive),
            "negative": points_body(negative),
            "box": box_body(box),
            "propagate": propagate,
            "options": options or {},
        }
        return self._job("segment", body, progress, cancel)["record"]

    def propagate(
        self,
        seeds: Sequence[int],
        options: dict[str, Any] | None = None,
        progress: Progress | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> list[dict[str, Any]]:
        """Grow the current mask on the ``seeds`` slices through the volume (using the
        logits of clicks there); returns why each direction stopped. ``filled`` then
        lists the slices interpolated rather than asked (``slice_step`` > 1)."""
        body = {"seeds": [int(z) for z in seeds], "options": options or {}}
        result = self._job("propagate", body, progress, cancel)
        self.filled = list(result.get("filled", []))  # absent from older servers
        return result["stops"]

    def set_mask(self, mask: np.ndarray, extent: tuple[slice, ...] | None = None) -> None:
        """Send a mask prompt: ``mask`` ``(K, J, I)`` replaces the server's in ``extent``
        (default: where it differs from the current mask); e.g. a slice painted by hand."""
        from RobustMedSAMLib.server.protocol import changed_extent, encode_patch

        mask = np.asarray(mask, bool)
        extent = extent or changed_extent(self.mask, mask)
        if extent is None:
            return
        answer = self._post("mask", {"patch": encode_patch(mask, extent)})
        apply_patch(self.mask, answer["patch"])

    def encode_ahead(
        self, seeds: Sequence[int], bounds: tuple[int, int] | None = None, slice_step: int = 1
    ) -> int:
        """Let the server encode slices in propagation order from ``seeds`` meanwhile,
        every ``slice_step``-th (the step propagation will ask with). Returns the count."""
        body = {"seeds": [int(z) for z in seeds], "bounds": list(bounds) if bounds else None}
        if slice_step != 1:  # a server from before the field refuses it; 1 is its default
            body["slice_step"] = slice_step
        return self._post("encode", body)["queued"]

    def undo(self) -> bool:
        """Undo the last interaction (click, mask, segment, propagate); False if none."""
        answer = self._post("undo")
        apply_patch(self.mask, answer["patch"])
        return answer["undone"]

    def fetch_mask(self) -> np.ndarray:
        """The server's whole current mask (a resynchronisation; normally not needed)."""
        self.mask[...] = False
        apply_patch(self.mask, self.client.request("GET", f"{self.path}/mask")["patch"])
        return self.mask

    def cancel(self) -> None:
        self._post("cancel")

    def close(self) -> None:
        """Free the session on the server (idle sessions also expire on their own)."""
        self.client.request("DELETE", self.path)

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close()
        except ServerError:
            pass  # the server is gone or the session expired: nothing to free

    def _job(self, kind, body, progress, cancel) -> dict[str, Any]:
        """Start a job, long-poll it (progress after each answer), cancel on request."""
        state = self._post(kind, body)
        cancelled = False
        while state["state"] == "running":
            if progress is not None and state["total"]:
                progress(state["done"], state["total"])
            if cancel is not None and not cancelled and cancel():
                self.cancel()
                cancelled = True
            state = self.client.request("GET", f"{self.path}/job?wait={POLL_SECONDS}")
        if state["state"] == "done":
            if progress is not None and state["total"]:
                progress(state["done"], state["total"])
            apply_patch(self.mask, state["result"]["patch"])
            return state["result"]
        error = state["error"] or {}
        if state["state"] == "cancelled":
            raise CancelledError(error.get("detail", "cancelled"))
        raise error_for(error.get("error", ""), error.get("detail", "the job failed"))


def read_token(token: str | None = None, token_file: str | None = None) -> str:
    """The bearer token: given, else from ``token_file`` (first line), else from
    ``$ROBUSTMEDSAM_TOKEN``. InputError naming what to set when there is none."""
    import os

    if token:
        return token.strip()
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as handle:
                line = handle.readline().strip()
        except OSError as error:
            raise InputError(f"cannot read token file {token_file}: {error.strerror}") from None
        if not line:
            raise InputError(f"token file {token_file} is empty")
        return line
    value = os.environ.get(TOKEN_ENV, "").strip()
    if not value:
        raise InputError(f"no server token: pass --token-file FILE or set ${TOKEN_ENV}")
    return value
