"""ORM rows → wire schemas (the only place that knows both shapes)."""

from __future__ import annotations

from app.api import schemas
from app.db import AdapterVersion, Dataset, FinetuningJob, JobMetric, Repo, User
from app.services import versions


def user(row: User) -> schemas.UserPublic:
    tenant = schemas.TenantPublic(
        name=row.tenant.name, short_code=row.tenant.short_code, uuid=row.tenant.uuid
    )
    return schemas.UserPublic(id=row.id, uuid=row.uuid, username=row.username, tenant=tenant)


def dataset(row: Dataset) -> schemas.DatasetPublic:
    return schemas.DatasetPublic(
        uuid=row.uuid,
        name=row.name,
        connection=schemas.ConnectionPublic(name=row.connection_name),
        status=row.status,
        last_error=row.last_error,
        file_name=row.file_name,
        format=row.format,
        row_count=row.row_count,
        columns=row.columns,
        split_counts=row.split_counts,
        preview=row.preview,
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        created_at=row.created_at,
    )


def _created_by(row: AdapterVersion) -> str:
    return row.created_by.username if row.created_by is not None else "deleted-user"


def repo(row: Repo) -> schemas.RepoPublic:
    summaries = [
        schemas.VersionSummary(
            tag=v.tag,
            created_at=v.created_at,
            created_by=_created_by(v),
            base_model=v.base_model,
            archived=v.archived,
            status=v.status,
            adapter_type=v.adapter_type,
        )
        for v in row.versions
    ]
    return schemas.RepoPublic(
        uuid=row.uuid,
        name=row.name,
        description=row.description,
        created_at=row.created_at,
        versions=summaries,
    )


def version(row: AdapterVersion) -> schemas.AdapterVersionPublic:
    return schemas.AdapterVersionPublic(
        uuid=row.uuid,
        repo=row.repo.name,
        tag=row.tag,
        archived=row.archived,
        base_model=row.base_model,
        status=row.status,
        adapter_type=row.adapter_type,
        source=row.source,
        adapter_path=versions.adapter_path(row),
        description=row.description,
        checkpoint=versions.last_checkpoint_step(row),
        finetuning_job=schemas.FinetuningJobRef(
            uuid=row.job.uuid if row.job is not None else None, error=row.error
        ),
        config=row.config,
        metrics_summary=row.metrics_summary,
        artifact_files=row.artifact_files,
        parent_version=versions.parent_ref(row),
        autoconfig=row.autoconfig,
        quality_report=row.quality_report,
        created_at=row.created_at,
        created_by=_created_by(row),
    )


def job(row: FinetuningJob) -> schemas.FinetuningJobPublic:
    return schemas.FinetuningJobPublic(
        uuid=row.uuid,
        base_model=row.base_model,
        dataset_name=row.dataset_name,
        target_repo_name=row.version.repo.name,
        target_version_tag=row.version.tag,
        # The worker class a job was placed on; unplaced jobs go to whichever worker takes the queue.
        accelerator=schemas.AcceleratorPublic(id=row.worker_class or "any"),
        status=row.status,
        params=row.params,
        description=row.description,
        error=row.error,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        attempt=row.attempt,
        steps_done=row.steps_done,
        total_steps=row.total_steps,
        worker_id=row.worker_id,
        continue_from_version=versions.parent_ref(row.version),
        placement=row.placement,
        worker_class=row.worker_class,
    )


def metric(row: JobMetric) -> schemas.JobMetricPublic:
    return schemas.JobMetricPublic.model_validate(row)
