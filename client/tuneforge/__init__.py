"""The thin tuneforge client: Predibase-shaped calls over HTTP (httpx + pydantic only)."""

from tuneforge.client import Tuneforge
from tuneforge.errors import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    ServerError,
    ServerUnreachableError,
    TuneforgeError,
    ValidationError,
)
from tuneforge.models import AdapterVersion, Connection, Dataset, FinetuningJobRef, Repo, VersionSummary

# Same constructor and call shapes, so `from tuneforge import Predibase as ...` drops into SDK code.
Predibase = Tuneforge

__all__ = [
    "AdapterVersion",
    "AuthenticationError",
    "ConflictError",
    "Connection",
    "Dataset",
    "FinetuningJobRef",
    "NotFoundError",
    "Predibase",
    "Repo",
    "ServerError",
    "ServerUnreachableError",
    "Tuneforge",
    "TuneforgeError",
    "ValidationError",
    "VersionSummary",
]
