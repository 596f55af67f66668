"""Admission of proxied serving requests: a tenant's in-flight slot, held until its response ends."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import httpx
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from app.services.quotas import ServingLimits, ServingSlot


def admit(request: Request, tenant: str) -> ServingSlot:
    """The tenant's slot for this request, or a 429 (too many in flight, or too many per second)."""
    limits: ServingLimits = request.app.state.serving_limits
    return limits.admit(tenant)


class SlotResponse(StreamingResponse):
    """Gives the slot (and the replica's in-flight count) back, and closes the upstream response,
    however the response ends: streamed to the end, failed, or left by the client.

    Done here rather than in the body generator's `finally`: a client that leaves before the first
    byte makes Starlette give up before the generator ever starts, and its `finally` never runs; the
    upstream stream left open would hold the serving process's slot until garbage collection.
    """

    def __init__(
        self,
        slot: ServingSlot,
        upstream: httpx.Response | None,
        *args: Any,
        on_close: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._slot = slot
        self._upstream = upstream
        self._on_close = on_close  # the replica's in-flight count (serving_processes.ReplicaLease)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._slot.release()
            if self._on_close is not None:
                self._on_close()
            if self._upstream is not None:
                with anyio.CancelScope(shield=True):
                    await self._upstream.aclose()
