"""Embeddings over HTTP: OpenAI's `POST /v1/embeddings` and LoRAX's `POST /embed`, for the base model or an
adapter of the caller's tenant.

Each vector is the mean of the input's final-norm hidden states, L2-normalised (embedding.py): the
dot product of two of them is their cosine similarity. Its length is the model's hidden size.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal, cast

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from worker.serving.adapters import ResolvedAdapter
from worker.serving.embedding import EmbeddingResult
from worker.serving.errors import InvalidParameterError
from worker.serving.http_common import RequestContext
from worker.serving.lorax_routes import ADAPTER_SOURCES
from worker.serving.params import (
    MAX_EMBEDDING_DIMENSIONS,
    MAX_EMBEDDING_INPUTS,
    MAX_NAME_LENGTH,
    MAX_PROMPT_CHARS,
    MAX_PROMPT_TOKEN_IDS,
    MAX_TOKEN_ID,
)

router = APIRouter()

_BOUNDED = ConfigDict(extra="ignore", allow_inf_nan=False)
Text = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
TokenIds = Annotated[
    list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]], Field(max_length=MAX_PROMPT_TOKEN_IDS)
]
EmbeddingInput = (
    Text
    | Annotated[list[Text], Field(max_length=MAX_EMBEDDING_INPUTS)]
    | TokenIds
    | Annotated[list[TokenIds], Field(max_length=MAX_EMBEDDING_INPUTS)]
)


class EmbeddingRequest(BaseModel):
    """OpenAI's embeddings request; `model` is an adapter id, or ""/the base model's name for none."""

    model_config = _BOUNDED

    input: EmbeddingInput
    model: str = Field(default="", max_length=MAX_NAME_LENGTH)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, le=MAX_EMBEDDING_DIMENSIONS)
    user: str | None = Field(default=None, max_length=MAX_NAME_LENGTH)  # accepted, not used


class EmbedParameters(BaseModel):
    """LoRAX's embed `parameters`: which adapter; lorax-client sends none at all (`null`)."""

    model_config = _BOUNDED

    adapter_id: str | None = Field(default=None, max_length=MAX_NAME_LENGTH)
    adapter_source: str | None = Field(default=None, max_length=MAX_NAME_LENGTH)
    adapter_parameters: dict[str, Any] | None = None
    api_token: str | None = Field(default=None, max_length=MAX_NAME_LENGTH)


class EmbedRequest(BaseModel):
    model_config = _BOUNDED

    inputs: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    parameters: EmbedParameters | None = None


def _refuse(condition: bool, field: str, message: str) -> None:
    if condition:
        raise InvalidParameterError(f"{field} {message}", field=field)


# --- routes ---------------------------------------------------------------------------------------


@router.post("/v1/embeddings", response_model=None)
async def create_embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
    ctx = RequestContext.of(request)
    inputs = await run_in_threadpool(_token_inputs, ctx, body.input)  # tokenizing is CPU work
    result = await ctx.engine.embed(inputs, await _adapter(ctx, body.model), field="input")
    _check_dimensions(body.dimensions, result)
    encode = _base64 if body.encoding_format == "base64" else _floats
    data = [
        {"object": "embedding", "index": i, "embedding": encode(row)} for i, row in enumerate(result.vectors)
    ]
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return {"object": "list", "data": data, "model": body.model or ctx.engine.model_name, "usage": usage}


@router.post("/embed", response_model=None)
async def embed(body: EmbedRequest, request: Request) -> dict[str, Any]:
    """LoRAX's embed: one text, `{"embeddings": [...]}`."""
    ctx = RequestContext.of(request)
    parameters = body.parameters or EmbedParameters()
    _refuse(
        parameters.adapter_source not in ADAPTER_SOURCES,
        "adapter_source",
        f"must be one of {ADAPTER_SOURCES[1:]}",
    )
    _refuse(
        parameters.adapter_parameters is not None,
        "adapter_parameters",
        "is not supported; pass one adapter_id",
    )
    inputs = await run_in_threadpool(_token_inputs, ctx, body.inputs)
    result = await ctx.engine.embed(inputs, await _adapter(ctx, parameters.adapter_id), field="inputs")
    return {"embeddings": _floats(result.vectors[0])}


# --- inputs and outputs ---------------------------------------------------------------------------


async def _adapter(ctx: RequestContext, model: str | None) -> ResolvedAdapter | None:
    """The adapter the request names, resolved for the caller's tenant exactly as generation does."""
    adapter_id = ctx.adapter_for(model)
    if not adapter_id:
        return None
    # Resolving reads the database (a deleted version must stop being served): off the event loop.
    return await run_in_threadpool(ctx.engine.resolve_adapter, adapter_id, ctx.tenant)


def _token_inputs(
    ctx: RequestContext, value: str | list[str] | list[int] | list[list[int]]
) -> list[list[int]]:
    """OpenAI's four input shapes as token-id lists: a text, texts, one list of ids, lists of ids."""
    if isinstance(value, str):
        return _encode(ctx, [value])
    if not value:
        return []  # refused by the engine's checks, naming the field
    if isinstance(value[0], int):
        return [cast(list[int], value)]
    if isinstance(value[0], str):
        return _encode(ctx, cast(list[str], value))
    return [list(ids) for ids in cast(list[list[int]], value)]


def _encode(ctx: RequestContext, texts: list[str]) -> list[list[int]]:
    # An empty text stays empty (no lone BOS) so that the engine refuses it, naming the input.
    encoded = iter(ctx.engine.tokenizer([t for t in texts if t])["input_ids"] if any(texts) else [])
    return [list(next(encoded)) if text else [] for text in texts]


def _check_dimensions(dimensions: int | None, result: EmbeddingResult) -> None:
    size = int(result.vectors.shape[1])
    _refuse(
        dimensions is not None and dimensions != size,
        "dimensions",
        f"must be absent or {size} (this model's hidden size): shortening embeddings is only meaningful "
        "for models trained for it (Matryoshka), which a causal LM's hidden states are not",
    )


def _floats(row: Any) -> list[float]:
    return list(row.tolist())


def _base64(row: Any) -> str:
    """OpenAI's base64 form: the float32 values, little-endian, base64-encoded."""
    return base64.b64encode(row.numpy().astype("<f4").tobytes()).decode("ascii")
