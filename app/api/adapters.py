"""Adapter version routes (`/v2/repos/{repo}/version/{tag}`) and the upload of an existing PEFT adapter."""

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from app.api import presenters, schemas
from app.api.deps import BaseUrlDep, CtxDep, CurrentUser, SessionDep, StorageRoom
from app.services import exports, versions
from app.services.adapter_files import uploads as adapter_uploads

router = APIRouter(tags=["adapters"])
VERSION_PATH = "/v2/repos/{repo}/version/{tag}"


@router.get(VERSION_PATH, response_model=schemas.AdapterVersionPublic)
def get_version(repo: str, tag: str, session: SessionDep, user: CurrentUser) -> schemas.AdapterVersionPublic:
    return presenters.version(versions.get(session, user, repo, tag))


@router.put(VERSION_PATH, response_model=schemas.AdapterVersionPublic)
def update_version(
    repo: str, tag: str, body: schemas.VersionUpdate, session: SessionDep, user: CurrentUser
) -> schemas.AdapterVersionPublic:
    version = versions.get(session, user, repo, tag)
    if body.archived is not None:
        versions.set_archived(session, version, body.archived)
    if body.description is not None:
        version.description = body.description
        session.commit()
    return presenters.version(version)


@router.delete(VERSION_PATH)
def delete_version(
    repo: str, tag: str, ctx: CtxDep, session: SessionDep, user: CurrentUser
) -> dict[str, Any]:
    versions.delete(ctx, session, versions.get(session, user, repo, tag))
    return {}


@router.get(VERSION_PATH + "/download")
def download_version(
    repo: str, tag: str, ctx: CtxDep, session: SessionDep, user: CurrentUser
) -> StreamingResponse:
    version = versions.get(session, user, repo, tag)
    filename = f"{version.repo.name}-{version.tag}.zip"
    return StreamingResponse(
        versions.download_chunks(ctx, version),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.post(
    VERSION_PATH + "/export",
    dependencies=[StorageRoom],
    status_code=202,
    responses={200: {"description": "the export is completed already (a whole model's: at once)"}},
)
def export_version(repo: str, tag: str, ctx: CtxDep, session: SessionDep, user: CurrentUser) -> JSONResponse:
    """Start the merged-model export (202), or answer the one asked for before (200 once completed)."""
    version = exports.request(ctx, session, versions.get(session, user, repo, tag))
    record = exports.record(version)
    return JSONResponse(record, status_code=200 if record["status"] == "completed" else 202)


@router.get(VERSION_PATH + "/export")
def get_export(repo: str, tag: str, session: SessionDep, user: CurrentUser) -> dict[str, Any]:
    return exports.record(versions.get(session, user, repo, tag))


@router.get(VERSION_PATH + "/export/download")
def download_export(
    repo: str, tag: str, ctx: CtxDep, session: SessionDep, user: CurrentUser
) -> StreamingResponse:
    version = versions.get(session, user, repo, tag)
    filename = f"{version.repo.name}-{version.tag}-merged.zip"
    return StreamingResponse(
        exports.download_chunks(ctx, version),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.post("/v2/adapters/upload", dependencies=[StorageRoom])
def begin_adapter_upload(
    body: schemas.AdapterUploadBegin,
    ctx: CtxDep,
    session: SessionDep,
    user: CurrentUser,
    base_url: BaseUrlDep,
) -> dict[str, Any]:
    return adapter_uploads.begin(ctx, session, user, body.repo, base_url)


# The SDK calls this path with a trailing slash; serve both rather than answer with a redirect.
@router.put("/v2/adapters/upload", response_model=schemas.AdapterVersionPublic, dependencies=[StorageRoom])
@router.put(
    "/v2/adapters/upload/",
    response_model=schemas.AdapterVersionPublic,
    include_in_schema=False,
    dependencies=[StorageRoom],
)
def finish_adapter_upload(
    body: schemas.AdapterUploadFinish, ctx: CtxDep, session: SessionDep, user: CurrentUser
) -> schemas.AdapterVersionPublic:
    return presenters.version(adapter_uploads.finish(ctx, session, user, body.upload_token))
