"""One request's stream from vLLM's `/v1/completions`: token ids and logprobs out, vLLM's errors as
tuneforge's ServingErrors, and the HTTP stream closed (vLLM aborts the request) however it ends."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import httpx

from worker.serving.adapters import ResolvedAdapter
from worker.serving.errors import (
    AdapterLoadError,
    AdapterNotFoundError,
    EngineError,
    EngineOverloadedError,
    InvalidParameterError,
    ServingError,
)


class VllmStream:
    """A streamed completion request; `tokens()` yields (token id, logprob, vLLM's finish reason or None)."""

    def __init__(self, client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> None:
        self._client, self._url, self._body = client, url, body
        self._response: httpx.Response | None = None

    async def tokens(
        self, adapter: ResolvedAdapter | None
    ) -> AsyncGenerator[tuple[int, float, str | None], None]:
        request = self._client.build_request("POST", self._url, json=self._body)
        self._response = response = await self._client.send(request, stream=True)
        if response.status_code != 200:
            raise error_from_vllm(
                response.status_code, (await response.aread()).decode(errors="replace"), adapter
            )
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                error = chunk["error"]
                raise error_from_vllm(int(error.get("code") or 500), json.dumps(chunk), adapter)
            for choice in chunk.get("choices", []):
                ids = choice.get("token_ids") or []
                logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or []
                for i, token in enumerate(ids):
                    last = i == len(ids) - 1
                    logprob = logprobs[i] if i < len(logprobs) and logprobs[i] is not None else 0.0
                    yield int(token), float(logprob), choice.get("finish_reason") if last else None

    async def aclose(self) -> None:
        if self._response is not None:
            await self._response.aclose()


def error_from_vllm(status: int, body: str, adapter: ResolvedAdapter | None) -> ServingError:
    """vLLM's error response as the ServingError tuneforge's engine would raise for the same failure."""
    message = _message(body)
    name = adapter.adapter_id if adapter is not None else None
    if status == 404 and name is not None:
        return AdapterNotFoundError(f"adapter {name} not found", field="adapter_id")
    if name is not None and status in (400, 422, 500) and "lora" in message.lower():
        # vLLM's message names only its own name for the adapter (tf-<sha>); its log has the reason.
        return AdapterLoadError(
            f"adapter {name} could not be loaded by vLLM (it serves PEFT LoRA adapters of the modules it "
            "supports; the server log has vLLM's reason); serve it from a deployment with engine 'tuneforge'",
            field="adapter_id",
        )
    if status == 503:
        return EngineOverloadedError("the vLLM engine is busy; retry shortly")
    if 400 <= status < 500:
        return InvalidParameterError(f"vLLM refused the request: {message[:300]}")
    return EngineError("the vLLM engine failed the request; retry it (the server log has details)")


def _message(body: str) -> str:
    try:
        parsed = json.loads(body)
    except ValueError:
        return body.strip()
    error = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error)


def check_adapter_config(adapter_id: str, config_path: Path, max_rank: int) -> None:
    """Refuses, with a reason a user can act on, what vLLM would fail to load with only a generic
    "could not be loaded": not a LoRA, DoRA, or a rank above the deployment's --max-lora-rank."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        raise AdapterLoadError(
            f"adapter {adapter_id}: its {config_path.name} is missing or not JSON", field="adapter_id"
        ) from None
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA" or config.get("use_dora"):
        kind = "a DoRA adapter" if peft_type == "LORA" else f"a {peft_type} adapter"
        raise AdapterLoadError(
            f"adapter {adapter_id} is {kind}; engine vllm serves plain LoRA adapters only (serve it from a "
            "deployment with engine 'tuneforge')",
            field="adapter_id",
        )
    ranks = [config.get("r") or 0, *(config.get("rank_pattern") or {}).values()]
    rank = max(int(r) for r in ranks if isinstance(r, int | float))
    if rank > max_rank:
        raise AdapterLoadError(
            f"adapter {adapter_id} has LoRA rank {rank}; this vLLM deployment serves ranks up to {max_rank} "
            "(raise it with --max-lora-rank or TUNEFORGE_VLLM_MAX_LORA_RANK)",
            field="adapter_id",
        )
