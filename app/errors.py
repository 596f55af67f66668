"""Domain errors (one base class) and the handlers that render every error as `{"error", "detail"}`
(OpenAI's `{"error": {message, type, param, code}}` on the OpenAI-compatible routes)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """A failure the caller can act on; `message` is shown to the user verbatim."""

    status_code = 400

    def __init__(self, message: str, status_code: int | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        if status_code is not None:
            self.status_code = status_code

    @property
    def headers(self) -> dict[str, str] | None:
        return None


class InvalidInputError(ServiceError):
    status_code = 422


class AuthenticationError(ServiceError):
    status_code = 401


class NotFoundError(ServiceError):
    """Also what another tenant's resource answers: its existence is not revealed."""

    status_code = 404


class ConflictError(ServiceError):
    status_code = 409


class PayloadTooLargeError(ServiceError):
    status_code = 413


class TooManyRequestsError(ServiceError):
    """A per-tenant limit: answered 429 with `Retry-After`, which the Predibase SDK sleeps before retrying."""

    status_code = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = max(1, retry_after)

    @property
    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after)}


# How soon a client should come back while the database is unreachable.
DATABASE_RETRY_AFTER_SECONDS = 5


class ServiceUnavailableError(ServiceError):
    """The server is at a limit of its own for the moment; the client retries after `retry_after` s."""

    status_code = 503

    def __init__(self, message: str, *, retry_after: int, detail: Any = None) -> None:
        super().__init__(message, detail=detail)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after)}


# The OpenAI-compatible routes answer errors in OpenAI's shape, so its SDK raises its own exceptions.
OPENAI_PATHS = ("/v1/files", "/v1/fine_tuning", "/v1/chat/completions", "/v1/completions", "/v1/models")
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
# A message that opens with the field it names ("training_file: ...") gives OpenAI's `param`.
_PARAM_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\[\]]{0,100}): ")


def is_openai_path(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in OPENAI_PATHS)


def openai_error(message: str, status_code: int) -> tuple[dict[str, Any], int]:
    """OpenAI's `{"error": {message, type, param, code}}`; a 422 is OpenAI's 400 for a bad request."""
    status = 400 if status_code == 422 else status_code
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    match = _PARAM_PREFIX.match(message)
    codes = {401: "invalid_api_key", 404: "not_found", 429: "rate_limit_exceeded"}
    body = {
        "message": message,
        "type": kind,
        "param": match.group(1) if match else None,
        "code": codes.get(status),
    }
    return {"error": body}, status


def error_response(
    request: Request,
    message: str,
    status_code: int,
    detail: Any = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """Every error the API answers: tuneforge's `{"error", "detail"}`, or OpenAI's on its routes."""
    if is_openai_path(request.url.path):
        body, status = openai_error(message, status_code)
        return JSONResponse(body, status_code=status, headers=headers)
    return JSONResponse(error_body(message, detail), status_code=status_code, headers=headers)


def error_body(message: str, detail: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": message}
    if detail is not None:
        body["detail"] = detail
    return body


def _describe_validation_error(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}"
        parts.append(_located(err))
    return "; ".join(parts) or "invalid request"


_MAX_LOCATION_PART = 64  # a key of the caller's is part of the location; the message repeats none longer


def _located(err: Any) -> str:
    """`field.path: message`; an error in a dict's key (pydantic's last part `[key]`) names the dict."""
    path = [str(p) for p in err.get("loc", ()) if p != "body"]
    message = str(err.get("msg"))
    if path[-1:] == ["[key]"]:
        path, message = path[:-2], "a key: " + message
    shown = (p if len(p) <= _MAX_LOCATION_PART else p[: _MAX_LOCATION_PART - 3] + "..." for p in path)
    return f"{'.'.join(shown) or 'body'}: {message}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(request, exc.message, exc.status_code, exc.detail, exc.headers)

    @app.exception_handler(OperationalError)
    @app.exception_handler(PoolTimeoutError)
    async def _database_unreachable(request: Request, exc: Exception) -> JSONResponse:
        return _database_outage(request, exc)

    @app.exception_handler(DataError)
    async def _unstorable_value(request: Request, exc: DataError) -> JSONResponse:
        # The request was accepted but holds a value the database cannot store (PostgreSQL: NUL in
        # text, an integer past its column). The driver's text is for the log, not the caller.
        log.info("unstorable value on %s %s: %s", request.method, request.url.path, exc.orig)
        nul = "NUL" in str(exc.orig)
        message = (
            "a text value holds a NUL character (\\u0000), which cannot be stored; remove it"
            if nul
            else "a value in the request is out of the range that can be stored; check its numbers"
        )
        return error_response(request, message, 422)

    @app.exception_handler(DBAPIError)
    async def _database_error(request: Request, exc: DBAPIError) -> JSONResponse:
        # A dropped connection surfaces as whichever DBAPI error the driver raised mid-statement.
        if exc.connection_invalidated:
            return _database_outage(request, exc)
        return await _unexpected(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, _describe_validation_error(exc), 422, jsonable_errors(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return error_response(request, message, exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request, "internal server error; see the server log", 500)


def _database_outage(request: Request, exc: Exception) -> JSONResponse:
    """503, not 500: the request was fine and will succeed once the database is back (the SDK retries)."""
    log.warning("database unreachable on %s %s: %s", request.method, request.url.path, exc)
    return error_response(
        request,
        "the database is unreachable; retry shortly",
        503,
        headers={"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)},
    )


def jsonable_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
