"""`client.repos`: create, get, list and delete adapter repositories."""

from __future__ import annotations

import builtins

from tuneforge._http import HttpTransport, path_segment
from tuneforge.models import Repo

RepoRef = str | Repo


def repo_name(repo: RepoRef) -> str:
    """The name (or uuid) that addresses a repo in URLs."""
    return repo.name if isinstance(repo, Repo) else repo


class Repos:
    """Repo calls with the Predibase SDK's shapes: `create`, `get`, `list`, `delete`."""

    def __init__(self, http: HttpTransport) -> None:
        self._http = http

    def create(self, name: str, description: str | None = None, exists_ok: bool = False) -> Repo:
        """Create a repo; with `exists_ok=True` an existing repo of that name is returned instead.

        Raises ConflictError (a ValidationError) when the name is taken and `exists_ok` is False.
        """
        body = {"name": name, "description": description, "existsOk": exists_ok}
        return Repo.model_validate(self._http.api("POST", "/v2/repos", json=body))

    def get(self, repo_ref: RepoRef) -> Repo:
        """A repo by name, uuid, or Repo (refreshed), with a summary of each of its versions."""
        return Repo.model_validate(self._http.api("GET", f"/v2/repos/{path_segment(repo_name(repo_ref))}"))

    def list(self, limit: int = 10, offset: int = 0) -> builtins.list[Repo]:
        """This tenant's repos, newest first (at most `limit`, 1 to 1000)."""
        body = self._http.api("GET", "/v2/repos", params={"limit": limit, "offset": offset})
        return [Repo.model_validate(item) for item in body["data"]["repos"]]

    def delete(self, repo_ref: RepoRef) -> None:
        """Delete a repo with all its versions and their stored files.

        Raises ConflictError while a version is still training.
        """
        self._http.api("DELETE", f"/v2/repos/{path_segment(repo_name(repo_ref))}")
