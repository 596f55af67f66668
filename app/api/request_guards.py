"""Refuses a request whose path or query holds a NUL character, before any route or query runs.

PostgreSQL cannot store or even compare text holding NUL (`\\x00`), so such a name reached the
database as an error; SQLite takes it. Refusing it at the edge gives both stacks the same 400 and
keeps it out of logs and lookups. NUL inside JSON bodies is answered by the DataError handler.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import error_body, is_openai_path, openai_error


class RefuseNulMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and _has_nul(scope):
            message = "the URL holds a NUL character (%00), which no name or parameter may contain"
            body, status = (
                openai_error(message, 400) if is_openai_path(scope["path"]) else (error_body(message), 400)
            )
            response = JSONResponse(body, status_code=status)
            if scope["type"] == "http":
                await response(scope, receive, send)
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        await self.app(scope, receive, send)


def _has_nul(scope: Scope) -> bool:
    raw_path = scope.get("raw_path") or scope.get("path", "").encode("utf-8", "surrogateescape")
    query = scope.get("query_string", b"")
    return (
        b"\x00" in unquote_to_bytes(raw_path)
        or b"\x00" in unquote_to_bytes(query)
        or ("\x00" in scope.get("path", ""))
    )
