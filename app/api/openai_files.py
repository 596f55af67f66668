"""OpenAI's Files API (`/v1/files`): upload, list, retrieve, delete, content; a file is a dataset."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from app.api import openai_presenters as present
from app.api import openai_schemas as oa
from app.api.deps import BaseUrlDep, CtxDep, CurrentUser, SessionDep, StorageRoom
from app.services import datasets, openai_files

router = APIRouter(tags=["openai"])
FILE_PATH = "/v1/files/{file_id}"


@router.post("/v1/files", response_model=oa.FileObject, dependencies=[StorageRoom])
def upload_file(
    ctx: CtxDep,
    session: SessionDep,
    user: CurrentUser,
    base_url: BaseUrlDep,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form(max_length=64)],
) -> oa.FileObject:
    """Validated before it answers (bounded wait): a file that is no dataset is a 400 saying why."""
    openai_files.require_purpose(purpose)
    name = file.filename or ""
    return present.file(openai_files.upload(ctx, session, user, name, file.file, base_url))


@router.get("/v1/files", response_model=oa.CursorList[oa.FileObject])
def list_files(
    session: SessionDep,
    user: CurrentUser,
    purpose: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: Annotated[str | None, Query(max_length=oa.MAX_FILE_ID_CHARS)] = None,
    order: Literal["asc", "desc"] = "desc",
) -> oa.CursorList[oa.FileObject]:
    page = openai_files.list_files(session, user, purpose=purpose, limit=limit, after=after, order=order)
    data = [present.file(row) for row in page.rows]
    first, last = (data[0].id, data[-1].id) if data else (None, None)
    return oa.CursorList(data=data, has_more=page.has_more, first_id=first, last_id=last)


@router.get(FILE_PATH, response_model=oa.FileObject)
def retrieve_file(file_id: str, session: SessionDep, user: CurrentUser) -> oa.FileObject:
    return present.file(openai_files.get(session, user, file_id))


@router.delete(FILE_PATH, response_model=oa.FileDeleted)
def delete_file(file_id: str, ctx: CtxDep, session: SessionDep, user: CurrentUser) -> oa.FileDeleted:
    dataset = openai_files.get(session, user, file_id)
    datasets.delete(ctx, session, dataset)
    return oa.FileDeleted(id=file_id)


@router.get(FILE_PATH + "/content")
def file_content(file_id: str, ctx: CtxDep, session: SessionDep, user: CurrentUser) -> StreamingResponse:
    dataset = openai_files.get(session, user, file_id)
    chunks = ctx.store.iter_chunks(dataset.blob_key, expected_sha256=dataset.sha256)
    return StreamingResponse(chunks, media_type="application/octet-stream")
