"""The HTTP layer under every namespace: auth header, error bodies → typed exceptions, retries, file I/O."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from tuneforge.errors import ServerUnreachableError, TuneforgeError, error_from_response

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# 429: the server asked us to slow down; 503: not ready or overloaded. Neither processed the request.
RETRY_STATUSES = frozenset({429, 503})
_DOWNLOAD_CHUNK_BYTES = 1024 * 1024


def path_segment(value: str | int) -> str:
    """One URL path segment, escaped so a name can never reach another route."""
    return quote(str(value), safe="")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently idempotent requests are retried; `max_retries=0` disables retries."""

    max_retries: int = 3
    backoff_seconds: float = 0.25
    max_backoff_seconds: float = 8.0

    def delay(self, retry: int, response: httpx.Response | None = None) -> float:
        """Seconds to wait before retry number `retry` (0-based); honours a numeric Retry-After."""
        retry_after: str = response.headers.get("retry-after", "") if response is not None else ""
        if retry_after.strip().isdigit():
            return min(float(retry_after), self.max_backoff_seconds)
        exponential = min(self.backoff_seconds * (2.0**retry), self.max_backoff_seconds)
        # Jitter keeps many clients that failed together from retrying in lockstep.
        return exponential * random.uniform(0.5, 1.0)


class HttpTransport:
    """Talks to one tuneforge server (and to the storage URLs it hands out) over a pooled httpx client."""

    def __init__(
        self,
        base_url: str,
        api_token: str,
        *,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        user_agent: str = "tuneforge-client",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {api_token}"}
        self._retry = retry or RetryPolicy()
        # No default auth header: presigned storage URLs must not receive (or leak) the API token.
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)), headers={"User-Agent": user_agent}
        )

    def close(self) -> None:
        """Release pooled connections."""
        self._client.close()

    # --- the API ------------------------------------------------------------------------------

    def api(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        idempotent: bool | None = None,
    ) -> Any:
        """Call an API route and return its decoded JSON body (None for an empty body)."""
        response = self.send(
            method, self.base_url + path, json=json, params=params, authenticated=True, idempotent=idempotent
        )
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise TuneforgeError(
                f"{method} {path}: expected JSON, got {response.headers.get('content-type', 'no body type')}",
                status=response.status_code,
            ) from None

    def open_stream(self, path: str, *, headers: Mapping[str, str] | None = None) -> httpx.Response:
        """GET an API route as a stream (e.g. Server-Sent Events); the caller must close the response.

        Opening it is retried like any GET; a failure while reading the body surfaces as
        httpx.TransportError, for the caller to decide whether to reconnect.
        """
        return self.send("GET", self.base_url + path, headers=headers, authenticated=True, stream=True)

    def download_api(self, path: str, dest: Path) -> Path:
        """Stream an authenticated API download (e.g. a zip) to `dest`."""
        return self._download(self.base_url + path, dest, authenticated=True)

    # --- presigned storage URLs ------------------------------------------------------------------

    def put_file(self, url: str, file_path: Path, content_type: str = "application/octet-stream") -> None:
        """PUT a local file's bytes, streamed, to a presigned URL (the server's own or S3's)."""
        self.send(
            "PUT", url, file_path=file_path, headers={"Content-Type": content_type}, authenticated=False
        )

    def download_url(self, url: str, dest: Path) -> Path:
        """Stream a presigned GET URL to `dest`."""
        return self._download(url, dest, authenticated=False)

    # --- the retry loop -------------------------------------------------------------------------

    def send(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        file_path: Path | None = None,
        authenticated: bool = True,
        idempotent: bool | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """Send with retries; return a 2xx/3xx response or raise the typed error for the failure.

        Only idempotent requests are retried (GET/PUT/DELETE unless the caller says otherwise): a
        retried POST could create something twice. With `stream=True` the caller closes the response.
        """
        method = method.upper()
        may_retry = method in IDEMPOTENT_METHODS if idempotent is None else idempotent
        attempts = 1 + (self._retry.max_retries if may_retry else 0)
        all_headers = {**(headers or {}), **(self._auth if authenticated else {})}
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = self._send_once(method, url, json, params, all_headers, file_path, stream)
            except httpx.TransportError as exc:
                if last:
                    raise _unreachable(method, url, attempts, exc) from exc
                time.sleep(self._retry.delay(attempt))
                continue
            if response.status_code in RETRY_STATUSES and not last:
                response.close()
                time.sleep(self._retry.delay(attempt, response))
                continue
            if response.is_error:
                response.read()
                response.close()
                raise error_from_response(response)
            return response
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _send_once(
        self,
        method: str,
        url: str,
        json: Any,
        params: Mapping[str, Any] | None,
        headers: Mapping[str, str],
        file_path: Path | None,
        stream: bool,
    ) -> httpx.Response:
        if file_path is None:
            request = self._client.build_request(method, url, json=json, params=params, headers=headers)
            return self._client.send(request, stream=stream)
        # Reopened per attempt so a retry sends the whole file again; httpx takes Content-Length from
        # the open file (S3 refuses chunked uploads) and streams it without reading it into memory.
        with file_path.open("rb") as body:
            request = self._client.build_request(method, url, content=body, params=params, headers=headers)
            return self._client.send(request, stream=stream)

    def _download(self, url: str, dest: Path, *, authenticated: bool) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".part")
        response = self.send("GET", url, authenticated=authenticated, stream=True)
        try:
            # Written aside and renamed at the end, so a failed download never looks like a finished one.
            with partial.open("wb") as out:
                for chunk in response.iter_bytes(_DOWNLOAD_CHUNK_BYTES):
                    out.write(chunk)
            os.replace(partial, dest)
        except httpx.TransportError as exc:
            raise _unreachable("GET", url, 1, exc) from exc
        finally:
            response.close()
            partial.unlink(missing_ok=True)
        return dest


def _unreachable(method: str, url: str, attempts: int, exc: httpx.TransportError) -> ServerUnreachableError:
    # Only the origin: a presigned URL's query string is a credential.
    parts = urlsplit(url)
    where = f"{parts.scheme}://{parts.netloc}"
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    reason = str(exc) or type(exc).__name__
    return ServerUnreachableError(f"could not reach {where} ({method} {parts.path}){tries}: {reason}")
