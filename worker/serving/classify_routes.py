"""Classification over HTTP, LoRAX's routes: `POST /classify` (one text) and `POST /classify_batch` (a list),
served by a classification adapter (task 'classification') of the caller's tenant named by `adapter_id`.

LoRAX answers its token-classification (NER) models with a list of entities; a sequence classifier's answer
is one label per text: `{"label", "score", "scores": [{"label", "score"}, ...]}`, scores summing to 1, in
the adapter's label order. The adapter's head reads the final-norm hidden state of the text's last token
(classifier.py), in the same passes as embeddings, so requests for several adapters share a pass.
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
async def classify(body: ClassifyRequest, request: Request) -> dict[str, Any]:
    ctx = RequestContext.of(request)
    return _answers(await _classify(ctx, [body.inputs], _adapter_id(body)))[0]


@router.post("/classify_batch", response_model=None)
async def classify_batch(body: ClassifyBatchRequest, request: Request) -> list[dict[str, Any]]:
    ctx = RequestContext.of(request)
    return _answers(await _classify(ctx, body.inputs, _adapter_id(body)))


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


def _answers(result: EmbeddingResult) -> list[dict[str, Any]]:
    labels = result.labels or ()
    answers = []
    for row in result.vectors.tolist():
        best = max(range(len(row)), key=row.__getitem__)
        scores = [{"label": label, "score": score} for label, score in zip(labels, row, strict=True)]
        answers.append({"label": labels[best], "score": row[best], "scores": scores})
    return answers
