"""The thin tuneforge client: Predibase-shaped calls over HTTP (httpx + pydantic only)."""

from tuneforge.client import Tuneforge
from tuneforge.config import FinetuningConfig
from tuneforge.deployments import (
    Deployment,
    DeploymentClient,
    DeploymentError,
    GenerateResponse,
    StreamResponse,
)
from tuneforge.errors import (
    AuthenticationError,
    ConflictError,
    FinetuningCanceledError,
    FinetuningError,
    NotFoundError,
    ServerError,
    ServerUnreachableError,
    TuneforgeError,
    ValidationError,
)
from tuneforge.models import (
    AdapterVersion,
    Connection,
    Dataset,
    FinetuningJob,
    FinetuningJobRef,
    JobMetric,
    JobPhase,
    Repo,
    VersionSummary,
)

# Same constructor and call shapes, so `from tuneforge import Predibase as ...` drops into SDK code.
Predibase = Tuneforge

__all__ = [
    "AdapterVersion",
    "AuthenticationError",
    "ConflictError",
    "Connection",
    "Dataset",
    "Deployment",
    "DeploymentClient",
    "DeploymentError",
    "FinetuningCanceledError",
    "FinetuningConfig",
    "FinetuningError",
    "FinetuningJob",
    "FinetuningJobRef",
    "GenerateResponse",
    "JobMetric",
    "JobPhase",
    "NotFoundError",
    "Predibase",
    "Repo",
    "ServerError",
    "ServerUnreachableError",
    "StreamResponse",
    "Tuneforge",
    "TuneforgeError",
    "ValidationError",
    "VersionSummary",
]
