"""`GET /users/current`: the session handshake every Predibase SDK client starts with."""

from fastapi import APIRouter

from app.api import presenters, schemas
from app.api.deps import CurrentUser

router = APIRouter(tags=["users"])


@router.get("/users/current", response_model=schemas.UserPublic)
def current_user(user: CurrentUser) -> schemas.UserPublic:
    return presenters.user(user)
