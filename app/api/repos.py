"""Repo routes: create (existsOk), list `{data: {repos}}`, get and delete by name or uuid."""

from typing import Annotated, Any

from fastapi import APIRouter, Query

from app.api import presenters, schemas
from app.api.deps import CtxDep, CurrentUser, SessionDep
from app.services import repos

router = APIRouter(tags=["repos"])


@router.post("/v2/repos", response_model=schemas.RepoPublic)
def create_repo(body: schemas.RepoCreate, session: SessionDep, user: CurrentUser) -> schemas.RepoPublic:
    return presenters.repo(repos.create(session, user, body.name, body.description, body.exists_ok))


@router.get("/v2/repos", response_model=schemas.DataEnvelope[schemas.RepoList])
def list_repos(
    session: SessionDep,
    user: CurrentUser,
    limit: Annotated[int, Query(ge=1, le=1000)] = 10,
    offset: Annotated[int, Query(ge=0, le=schemas.MAX_PAGE_OFFSET)] = 0,
) -> schemas.DataEnvelope[schemas.RepoList]:
    rows, total = repos.list_repos(session, user, limit, offset)
    return schemas.DataEnvelope(data=schemas.RepoList(repos=[presenters.repo(r) for r in rows], count=total))


@router.get("/v2/repos/{ref}", response_model=schemas.RepoPublic)
def get_repo(ref: str, session: SessionDep, user: CurrentUser) -> schemas.RepoPublic:
    return presenters.repo(repos.get(session, user, ref))


@router.delete("/v2/repos/{ref}")
def delete_repo(ref: str, ctx: CtxDep, session: SessionDep, user: CurrentUser) -> dict[str, Any]:
    repos.delete(ctx, session, repos.get(session, user, ref))
    return {}
