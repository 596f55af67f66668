"""Classification over HTTP, LoRAX's routes: `POST /classify` (one text) and `POST /classify_batch` (a list),
served by a classification adapter (task 'classification') of the caller's tenant named by `adapter_id`.

The answers have LoRAX's shape, so that clients written for it (lorax-client's `classify`) read them:
LoRAX classifies tokens (NER) and answers a text with a list of entities `{"entity_group", "score", "word",
"start", "end"}` (`/classify_batch`: one such list per text). A sequence classifier's verdict is about the
whole text, so its list holds one entity spanning it: the best label and its probability, the text, and
character offsets 0 and len(text). The entity also carries `scores`, every label's probability in the
adapter's label order (summing to 1), which LoRAX's entities do not have and its clients ignore.

The adapter's head reads the final-norm hidden state of the text's last token (classifier.py), in the same
passes as embeddings, so requests for several adapters share a pass.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from worker.serving.adapters import ResolvedAdapter
from worker.serving.embedding import EmbeddingResult
from worker.serving.errors import NotSupportedError
from worker.serving.http_common import RequestContext
from worker.serving.params import MAX_CLASSIFY_INPUTS, MAX_NAME_LENGTH, MAX_PROMPT_CHARS

router = APIRouter()

_BOUNDED = ConfigDict(extra="ignore", allow_inf_nan=False)
Text = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]


class ClassifyParameters(BaseModel):
    model_config = _BOUNDED

    adapter_id: str | None = Field(default=None, max_length=MAX_NAME_LENGTH)


class ClassifyRequest(BaseModel):
    """`adapter_id` at the top level, or in `parameters` as the other LoRAX routes take it."""

    model_config = _BOUNDED

    inputs: Text
    adapter_id: str | None = Field(default=None, max_length=MAX_NAME_LENGTH)
    parameters: ClassifyParameters | None = None


class ClassifyBatchRequest(BaseModel):
    model_config = _BOUNDED

    inputs: list[Text] = Field(min_length=1, max_length=MAX_CLASSIFY_INPUTS)
    adapter_id: str | None = Field(default=None, max_length=MAX_NAME_LENGTH)
    parameters: ClassifyParameters | None = None


@router.post("/classify", response_model=None)
async def classify(body: ClassifyRequest, request: Request) -> list[dict[str, Any]]:
    ctx = RequestContext.of(request)
    return _entities([body.inputs], await _classify(ctx, [body.inputs], _adapter_id(body)))[0]


@router.post("/classify_batch", response_model=None)
async def classify_batch(body: ClassifyBatchRequest, request: Request) -> list[list[dict[str, Any]]]:
    ctx = RequestContext.of(request)
    return _entities(body.inputs, await _classify(ctx, body.inputs, _adapter_id(body)))


def _adapter_id(body: ClassifyRequest | ClassifyBatchRequest) -> str | None:
    return body.adapter_id or (body.parameters.adapter_id if body.parameters is not None else None)


async def _classify(ctx: RequestContext, texts: list[str], adapter_id: str | None) -> EmbeddingResult:
    adapter = await _adapter(ctx, adapter_id)
    inputs = await run_in_threadpool(lambda: [list(ids) for ids in ctx.engine.tokenizer(texts)["input_ids"]])
    return await ctx.engine.classify(inputs, adapter, field="inputs")


async def _adapter(ctx: RequestContext, adapter_id: str | None) -> ResolvedAdapter:
    model = ctx.adapter_for(adapter_id)
    if not model:
        raise NotSupportedError(
            f"adapter_id: {ctx.engine.model_name} has no classification head; name a classification "
            "adapter (one trained with task 'classification') as adapter_id",
            field="adapter_id",
        )
    # Resolving reads the database (a deleted version must stop being served): off the event loop.
    return await run_in_threadpool(ctx.engine.resolve_adapter, model, ctx.tenant)


def _entities(texts: list[str], result: EmbeddingResult) -> list[list[dict[str, Any]]]:
    """Each text's answer: a list of one entity spanning the text (see the module's docstring)."""
    labels = result.labels or ()
    answers = []
    for text, row in zip(texts, result.vectors.tolist(), strict=True):
        best = max(range(len(row)), key=row.__getitem__)
        scores = [{"label": label, "score": score} for label, score in zip(labels, row, strict=True)]
        entity = {
            "entity_group": labels[best],
            "score": row[best],
            "word": text,
            "start": 0,
            "end": len(text),
        }
        answers.append([entity | {"scores": scores}])
    return answers
