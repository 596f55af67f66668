"""SQLAlchemy models (one module per aggregate) and the session factory."""

from app.db.base import Base
from app.db.base_models import StoredModel
from app.db.datasets import Dataset, DatasetStatus
from app.db.deployments import Deployment
from app.db.jobs import FinetuningJob, JobCheckpoint, JobEvent, JobEventKind, JobMetric, JobStatus
from app.db.repos import AdapterVersion, ExportStatus, Repo, VersionSource, VersionStatus
from app.db.tenants import ApiToken, Tenant, User

__all__ = [
    "AdapterVersion",
    "ApiToken",
    "Base",
    "Dataset",
    "DatasetStatus",
    "Deployment",
    "ExportStatus",
    "FinetuningJob",
    "JobCheckpoint",
    "JobEvent",
    "JobEventKind",
    "JobMetric",
    "JobStatus",
    "Repo",
    "StoredModel",
    "Tenant",
    "User",
    "VersionSource",
    "VersionStatus",
]
