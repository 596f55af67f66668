"""The admin dashboard at /ui: static files (no build step) that call the JSON API with a bearer token.

The token lives in the browser's session storage and travels as an `Authorization` header, never as
a cookie, so no request the page did not make itself can carry it (no CSRF surface). The strict
content-security policy keeps every script and style to files served from here.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).parent / "static"
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The page is small; a stale copy after an upgrade would call routes that changed.
    "Cache-Control": "no-cache",
}


class DashboardFiles(StaticFiles):
    """StaticFiles serving index.html for the directory, every response with the security headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def mount(app: FastAPI) -> None:
    app.mount("/ui", DashboardFiles(directory=STATIC_DIR, html=True), name="ui")
