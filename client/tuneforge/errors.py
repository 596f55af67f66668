"""The client's exception family: one base class, one subclass per kind of failure a caller handles."""

from __future__ import annotations

import json
from typing import Any

import httpx

# How much of a non-JSON error body (an S3 XML error, a proxy's HTML page) a message quotes.
_MAX_BODY_CHARS = 300


# RuntimeError as the base: the Predibase SDK raises RuntimeError for API errors, so code written
# against it (`except RuntimeError`) keeps working when pointed at tuneforge.
class TuneforgeError(RuntimeError):
    """Any failure reported by tuneforge or met on the way to it.

    `message` is the server's `error` text (or the client's own explanation), `status` the HTTP
    status (None when no response came back) and `detail` the server's optional `detail` field.
    """

    def __init__(self, message: str, *, status: int | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status})" if self.status is not None else self.message


# ValueError too: the Predibase SDK raises ValueError for bad local input and failed datasets.
class ValidationError(TuneforgeError, ValueError):
    """The request or its data was refused (HTTP 400/409/413/422, or checked before sending)."""


class ConflictError(ValidationError):
    """The name is taken or the resource is in a state that forbids the change (HTTP 409)."""


class NotFoundError(TuneforgeError, LookupError):
    """No such resource for this tenant (HTTP 404)."""


class AuthenticationError(TuneforgeError):
    """The API token is missing, wrong or revoked, or lacks access (HTTP 401/403)."""


class ServerError(TuneforgeError):
    """The server failed (HTTP 5xx); the server log has the cause."""


# ConnectionError too, so generic network-failure handling catches it.
class ServerUnreachableError(TuneforgeError, ConnectionError):
    """No HTTP response at all: connection refused, DNS failure, timeout or a dropped connection."""


class FinetuningError(TuneforgeError):
    """A fine-tuning job ended without an adapter: `message` carries the job's own error.

    `job_uuid` and `adapter_id` (`repo/tag`) name what failed; `job_status` is the final status.
    """

    def __init__(self, message: str, *, job_uuid: str, adapter_id: str, job_status: str) -> None:
        super().__init__(message)
        self.job_uuid = job_uuid
        self.adapter_id = adapter_id
        self.job_status = job_status


class FinetuningCanceledError(FinetuningError):
    """The fine-tuning job was canceled before it finished."""


_BY_STATUS: dict[int, type[TuneforgeError]] = {
    400: ValidationError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    413: ValidationError,
    422: ValidationError,
}


def error_for_status(status: int) -> type[TuneforgeError]:
    """The exception class that represents an error response with this status."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return ServerError if status >= 500 else TuneforgeError


def error_from_response(response: httpx.Response, context: str = "") -> TuneforgeError:
    """Build the typed exception for an error response; the body has been read already.

    tuneforge answers `{"error": ..., "detail"?: ...}`; anything else (S3's XML, a proxy page) is
    quoted, shortened, so the caller still sees what came back.
    """
    message, detail = _parse_body(response)
    if context:
        message = f"{context}: {message}"
    return error_for_status(response.status_code)(message, status=response.status_code, detail=detail)


def _parse_body(response: httpx.Response) -> tuple[str, Any]:
    text = response.text
    try:
        body = json.loads(text) if text else None
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"], body.get("detail")
    if isinstance(body, dict) and isinstance(body.get("detail"), str):  # a bare FastAPI/Starlette error
        return body["detail"], None
    snippet = " ".join(text.split())[:_MAX_BODY_CHARS]
    reason = response.reason_phrase or "error"
    return (f"{reason}: {snippet}" if snippet else reason), None
