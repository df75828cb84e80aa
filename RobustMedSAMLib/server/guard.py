"""The first thing every request meets: the bearer token (compared in constant time)
and the body size limits, checked before any body is read."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse

from RobustMedSAMLib.server.sessions import owner_of

if TYPE_CHECKING:
    from RobustMedSAMLib.server.app import ServerConfig

MiB = 2**20


class Guard:
    """ASGI middleware: 401 without a valid bearer token, 411 for a body of unknown
    length, 413 for a body over the limit (the volume upload has its own)."""

    def __init__(self, app, config: ServerConfig) -> None:
        self.app, self.config = app, config
        self.tokens = [t.encode() for t in config.tokens]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        owner = self._owner(headers.get(b"authorization", b""))
        if owner is None:
            return await _refuse(
                scope,
                receive,
                send,
                401,
                "auth",
                "missing or wrong bearer token (Authorization: Bearer TOKEN)",
            )
        if scope["method"] in ("POST", "PUT", "PATCH"):
            length = headers.get(b"content-length")
            upload = scope["path"] == "/v1/sessions"
            limit = self.config.max_upload_bytes if upload else self.config.max_request_bytes
            if length is None or not length.isdigit():
                return await _refuse(
                    scope,
                    receive,
                    send,
                    411,
                    "length",
                    "send a Content-Length header (no chunked bodies)",
                )
            if int(length) > limit:
                what = "volume upload" if upload else "request"
                return await _refuse(
                    scope,
                    receive,
                    send,
                    413,
                    "too_large",
                    f"{what} of {int(length) // MiB} MB exceeds this server's "
                    f"limit of {limit // MiB} MB",
                )
        scope.setdefault("state", {})["owner"] = owner
        await self.app(scope, receive, send)

    def _owner(self, header: bytes) -> str | None:
        scheme, _, given = header.partition(b" ")
        found = None
        for token in self.tokens:  # every token compared, in constant time each
            if hmac.compare_digest(given.strip(), token) and scheme.lower() == b"bearer":
                found = token
        return None if found is None else owner_of(found.decode())


async def _refuse(scope, receive, send, status: int, kind: str, detail: str) -> None:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    response = JSONResponse({"error": kind, "detail": detail}, status, headers=headers)
    await response(scope, receive, send)
