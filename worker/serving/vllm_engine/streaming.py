"""One request's stream from vLLM's `/v1/completions`: token ids and logprobs out, vLLM's errors as
tuneforge's ServingErrors, and the HTTP stream closed (vLLM aborts the request) however it ends.

Logprobs come in OpenAI's legacy shape, one entry per token; the request asks for its tokens as
`token_id:<id>` strings (`return_tokens_as_token_ids`), so each entry and alternative maps back to an
id. A scored prompt comes with `echo`: the first chunk's entries begin with the prompt's (the first
one null), and its `prompt_token_ids` say how many there are.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, NamedTuple

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
from worker.serving.outputs import PromptLogprobs, TopLogprobs

TOKEN_ID_PREFIX = "token_id:"


class StreamedToken(NamedTuple):
    """One generated token from vLLM, with what the request asked of logprobs (the scored prompt on the
    first token only)."""

    token_id: int
    logprob: float
    finish_reason: str | None
    top: TopLogprobs = ()
    prompt: PromptLogprobs | None = None


class VllmStream:
    """A streamed completion request; `tokens()` yields each generated token (`StreamedToken`), with its
    `top_k` alternatives and, when `prompt_k` is not None, the scored prompt with `prompt_k` of its own."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        body: dict[str, Any],
        *,
        top_k: int = 0,
        prompt_k: int | None = None,
    ) -> None:
        self._client, self._url, self._body = client, url, body
        self._top_k, self._prompt_k = top_k, prompt_k
        self._response: httpx.Response | None = None

    async def tokens(self, adapter: ResolvedAdapter | None) -> AsyncGenerator[StreamedToken, None]:
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
                for token in parse_choice(choice, self._top_k, self._prompt_k):
                    yield token

    async def aclose(self) -> None:
        if self._response is not None:
            await self._response.aclose()


def parse_choice(choice: dict[str, Any], top_k: int, prompt_k: int | None) -> list[StreamedToken]:
    """The generated tokens of one streamed choice of vLLM's /v1/completions (see the module docstring)."""
    ids = [int(token) for token in choice.get("token_ids") or []]
    logprobs = choice.get("logprobs") or {}
    values: list[float | None] = list(logprobs.get("token_logprobs") or [])
    tops: list[dict[str, float] | None] = list(logprobs.get("top_logprobs") or [])
    prompt_ids = [int(token) for token in choice.get("prompt_token_ids") or []]
    prompt: PromptLogprobs | None = None
    tops += [None] * (len(values) - len(tops))
    if prompt_k is not None and prompt_ids and len(values) >= len(prompt_ids) + len(ids):
        n = len(prompt_ids)
        pairs = zip(values[:n], tops[:n], strict=True)
        prompt_tops = tuple(_top(top, prompt_k) if value is not None else () for value, top in pairs)
        prompt = PromptLogprobs(tuple(prompt_ids), tuple(values[:n]), prompt_tops)
        values, tops = values[n:], tops[n:]
    tokens = []
    for i, token in enumerate(ids):
        value = values[i] if i < len(values) else None
        top = _top(tops[i] if i < len(tops) else None, top_k)
        reason = choice.get("finish_reason") if i == len(ids) - 1 else None
        logprob = float(value) if value is not None else 0.0
        tokens.append(StreamedToken(token, logprob, reason, top, prompt if i == 0 else None))
    return tokens


def _top(alternatives: dict[str, float] | None, k: int) -> TopLogprobs:
    """The k most likely of one entry's alternatives (vLLM adds the chosen token to its top k)."""
    if not alternatives or k == 0:
        return ()
    pairs = [(_token_id(token), float(value)) for token, value in alternatives.items()]
    return tuple(sorted(pairs, key=lambda pair: -pair[1])[:k])


def _token_id(token: str) -> int:
    if not token.startswith(TOKEN_ID_PREFIX):
        raise EngineError(f"vLLM sent a logprob token {token[:40]!r} without its id; retry the request")
    return int(token[len(TOKEN_ID_PREFIX) :])


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
