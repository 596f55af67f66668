"""Domain errors (one base class) and the handlers that render every error as `{"error", "detail"}`."""

from __future__ import annotations

import logging
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


def error_body(message: str, detail: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": message}
    if detail is not None:
        body["detail"] = detail
    return body


def _describe_validation_error(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        location = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        if err.get("type") == "json_invalid":
            return f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}"
        parts.append(f"{location or 'body'}: {err.get('msg')}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.message, exc.detail), status_code=exc.status_code, headers=exc.headers
        )

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
        return JSONResponse(error_body(message), status_code=422)

    @app.exception_handler(DBAPIError)
    async def _database_error(request: Request, exc: DBAPIError) -> JSONResponse:
        # A dropped connection surfaces as whichever DBAPI error the driver raised mid-statement.
        if exc.connection_invalidated:
            return _database_outage(request, exc)
        return await _unexpected(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            error_body(_describe_validation_error(exc), jsonable_errors(exc)), status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return JSONResponse(error_body(message), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal server error; see the server log"), status_code=500)


def _database_outage(request: Request, exc: Exception) -> JSONResponse:
    """503, not 500: the request was fine and will succeed once the database is back (the SDK retries)."""
    log.warning("database unreachable on %s %s: %s", request.method, request.url.path, exc)
    return JSONResponse(
        error_body("the database is unreachable; retry shortly"),
        status_code=503,
        headers={"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)},
    )


def jsonable_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")} for e in exc.errors()]
