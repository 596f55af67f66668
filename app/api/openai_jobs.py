"""OpenAI's fine-tuning API (`/v1/fine_tuning/jobs`): create, list, retrieve, cancel, events, checkpoints."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Query, Request

from app.api import openai_presenters as present
from app.api import openai_schemas as oa
from app.api.deps import CtxDep, CurrentUser, SessionDep
from app.errors import InvalidInputError
from app.services import jobs, openai_jobs

router = APIRouter(tags=["openai"])
JOBS_PATH = "/v1/fine_tuning/jobs"
JOB_PATH = JOBS_PATH + "/{job_id}"
Limit = Annotated[int, Query(ge=1, le=1000)]
After = Annotated[str | None, Query(max_length=64)]


@router.post(JOBS_PATH, response_model=oa.FineTuningJob)
def create_job(body: oa.JobCreate, ctx: CtxDep, session: SessionDep, user: CurrentUser) -> oa.FineTuningJob:
    job = openai_jobs.create(ctx, session, user, job_request(body))
    return present.job(session, job)


def job_request(body: oa.JobCreate) -> openai_jobs.JobRequest:
    """The request as the service takes it; what tuneforge cannot do honestly is a 400 saying so."""
    if body.integrations:
        raise InvalidInputError(
            "integrations: not supported; tuneforge records metrics itself (GET .../events)"
        )
    method = body.method.type if body.method is not None else "supervised"
    hyperparameters = body.hyperparameters.model_dump() if body.hyperparameters is not None else {}
    chosen = _method_hyperparameters(body.method)
    if chosen is not None:  # the method's own hyperparameters replace the deprecated top-level ones
        given = {k: v for k, v in chosen.model_dump().items() if v is not None}
        hyperparameters = {**hyperparameters, **given}
    return openai_jobs.JobRequest(
        model=body.model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        method=method,
        hyperparameters=hyperparameters,
        suffix=body.suffix,
        seed=body.seed,
        metadata=body.metadata,
    )


def _method_hyperparameters(method: oa.Method | None) -> oa.Hyperparameters | None:
    if method is None:
        return None
    if method.type == "dpo":
        return method.dpo.hyperparameters if method.dpo is not None else None
    if method.type == "supervised":
        return method.supervised.hyperparameters if method.supervised is not None else None
    return None


@router.get(JOBS_PATH, response_model=oa.CursorList[oa.FineTuningJob])
def list_jobs(
    request: Request, session: SessionDep, user: CurrentUser, after: After = None, limit: Limit = 20
) -> oa.CursorList[oa.FineTuningJob]:
    labels = metadata_filter(request.query_params.multi_items())
    page = openai_jobs.list_jobs(session, user, limit, after, labels)
    return oa.CursorList(data=[present.job(session, row) for row in page.rows], has_more=page.has_more)


_METADATA_PARAM = re.compile(r"metadata\[(.*)\]", re.DOTALL)


def metadata_filter(params: list[tuple[str, str]]) -> dict[str, str]:
    """OpenAI's `metadata[key]=value` query parameters (the SDK's `metadata={...}`): jobs whose metadata
    has every pair; within its bounds on metadata (16 pairs, keys of 64, values of 512 characters)."""
    wanted: dict[str, str] = {}
    for name, value in params:
        match = _METADATA_PARAM.fullmatch(name)
        if match is None:
            continue
        key = match.group(1)
        if not key or len(key) > oa.MAX_METADATA_KEY_CHARS or len(value) > oa.MAX_METADATA_VALUE_CHARS:
            raise InvalidInputError(
                f"metadata: a filter's key must have 1 to {oa.MAX_METADATA_KEY_CHARS} characters and its "
                f"value at most {oa.MAX_METADATA_VALUE_CHARS}, as job metadata has"
            )
        wanted[key] = value
    if len(wanted) > oa.MAX_METADATA_KEYS:
        raise InvalidInputError(f"metadata: at most {oa.MAX_METADATA_KEYS} pairs to filter on")
    return wanted


@router.get(JOB_PATH, response_model=oa.FineTuningJob)
def retrieve_job(job_id: str, session: SessionDep, user: CurrentUser) -> oa.FineTuningJob:
    return present.job(session, openai_jobs.get(session, user, job_id))


@router.post(JOB_PATH + "/cancel", response_model=oa.FineTuningJob)
def cancel_job(job_id: str, session: SessionDep, user: CurrentUser) -> oa.FineTuningJob:
    job = openai_jobs.get(session, user, job_id)
    jobs.request_cancel(session, job)
    session.commit()
    return present.job(session, job)


@router.get(JOB_PATH + "/events", response_model=oa.CursorList[oa.JobEvent])
def list_events(
    job_id: str, session: SessionDep, user: CurrentUser, after: After = None, limit: Limit = 20
) -> oa.CursorList[oa.JobEvent]:
    job = openai_jobs.get(session, user, job_id)
    page = openai_jobs.list_events(session, job, limit, after)
    data = [present.event(row, job.total_steps) for row in page.rows]
    return oa.CursorList(data=data, has_more=page.has_more)


@router.get(JOB_PATH + "/checkpoints", response_model=oa.CursorList[oa.JobCheckpoint])
def list_checkpoints(
    job_id: str, session: SessionDep, user: CurrentUser, after: After = None, limit: Limit = 10
) -> oa.CursorList[oa.JobCheckpoint]:
    job = openai_jobs.get(session, user, job_id)
    page = openai_jobs.list_checkpoints(session, job, limit, after)
    metrics = openai_jobs.metrics_at(session, job, [row.step for row in page.rows])
    data = [present.checkpoint(row, job, metrics.get(row.step)) for row in page.rows]
    first, last = (data[0].id, data[-1].id) if data else (None, None)
    return oa.CursorList(data=data, has_more=page.has_more, first_id=first, last_id=last)
