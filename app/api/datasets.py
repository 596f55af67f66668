"""Dataset routes: the Predibase upload flow (begin → PUT bytes → finish), lookup, download link, delete."""

from pathlib import PurePosixPath
from typing import Annotated, Any

from fastapi import APIRouter, Query

from app.api import presenters, schemas
from app.api.deps import BaseUrlDep, CtxDep, CurrentUser, SessionDep, StorageRoom
from app.services import datasets
from app.services.dataset_files import lengths as dataset_lengths

router = APIRouter(tags=["datasets"])


@router.post("/v2/datasets/upload", response_model=schemas.DatasetUploadBegun, dependencies=[StorageRoom])
def begin_upload(
    body: schemas.DatasetUploadBegin, ctx: CtxDep, user: CurrentUser, base_url: BaseUrlDep
) -> schemas.DatasetUploadBegun:
    url, token = datasets.begin_upload(ctx, user, body.file_name, base_url, body.size_bytes)
    return schemas.DatasetUploadBegun(presigned_url=url, upload_token=token)


@router.put("/v2/datasets/upload", response_model=schemas.DatasetPublic, dependencies=[StorageRoom])
def finish_upload(
    body: schemas.DatasetUploadFinish, ctx: CtxDep, session: SessionDep, user: CurrentUser
) -> schemas.DatasetPublic:
    # Registers the bytes and, after the commit, sends the dataset to a validate worker.
    return presenters.dataset(datasets.finish_upload(ctx, session, user, body.name, body.upload_token))


@router.get("/v1/datasets/name/{name}", response_model=schemas.DatasetPublic)
def get_by_name(
    name: str,
    session: SessionDep,
    user: CurrentUser,
    connection_name: Annotated[str, Query()] = "file_uploads",
) -> schemas.DatasetPublic:
    return presenters.dataset(datasets.get_by_name(session, user, name, connection_name))


@router.get("/v2/datasets")
def list_datasets(
    session: SessionDep,
    user: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=schemas.MAX_PAGE_OFFSET)] = 0,
) -> dict[str, Any]:
    rows, total = datasets.list_datasets(session, user, limit, offset)
    return {
        "data": [presenters.dataset(r).model_dump(by_alias=True, mode="json") for r in rows],
        "count": total,
    }


@router.get("/v2/datasets/{ref}", response_model=schemas.DatasetPublic)
def get_dataset(ref: str, session: SessionDep, user: CurrentUser) -> schemas.DatasetPublic:
    return presenters.dataset(datasets.get(session, user, ref))


@router.get("/v2/datasets/{ref}/download-link", response_model=schemas.DatasetDownloadLink)
def download_link(
    ref: str, ctx: CtxDep, session: SessionDep, user: CurrentUser, base_url: BaseUrlDep
) -> schemas.DatasetDownloadLink:
    dataset = datasets.get(session, user, ref)
    extension = PurePosixPath(dataset.file_name).suffix.lstrip(".")
    return schemas.DatasetDownloadLink(
        url=datasets.download_link(ctx, dataset, base_url), file_extension=extension
    )


@router.get("/v2/datasets/{ref}/lengths", response_model=schemas.DatasetLengths)
def row_lengths(ref: str, ctx: CtxDep, session: SessionDep, user: CurrentUser) -> schemas.DatasetLengths:
    """The token-length histogram the dashboard draws; 409 until the dataset is connected."""
    summary = dataset_lengths.lengths_of(ctx, datasets.get(session, user, ref))
    return schemas.DatasetLengths.model_validate(summary)


@router.delete("/v2/datasets/{ref}")
def delete_dataset(ref: str, ctx: CtxDep, session: SessionDep, user: CurrentUser) -> dict[str, Any]:
    datasets.delete(ctx, session, datasets.get(session, user, ref))
    return {}
