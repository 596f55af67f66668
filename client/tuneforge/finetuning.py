"""`client.finetuning.jobs`: start fine-tuning jobs, follow them live, inspect their metrics, cancel them."""

from __future__ import annotations

import builtins
import sys
from collections.abc import Mapping
from typing import Any

import pydantic

from tuneforge._http import HttpTransport, path_segment
from tuneforge.adapter_ids import parse_version_ref
from tuneforge.config import FinetuningConfig
from tuneforge.config_errors import config_errors
from tuneforge.errors import ValidationError
from tuneforge.models import AdapterVersion, Dataset, FinetuningJob, JobMetric, JobPhase
from tuneforge.repos import RepoRef, repo_name
from tuneforge.watcher import JobWatcher

ConfigLike = FinetuningConfig | Mapping[str, Any]
_JSON_PARAMS = pydantic.TypeAdapter(dict[str, Any])
JobRef = str | FinetuningJob


def finetuning_params(config: ConfigLike, *, continuing: bool = False) -> dict[str, Any]:
    """A job's `params`: the config checked locally, with only the fields the caller set.

    Unset fields are left to the server's defaults or, with `continuing` (the job continues from an
    adapter version), to that version's config, base model included. A dict is validated first, so
    a bad field raises ValidationError naming it before anything is sent. Checks across fields are
    left to the server when continuing: the parent's config supplies the fields they compare with.
    """
    if not isinstance(config, FinetuningConfig):
        if not isinstance(config, Mapping):
            kind = type(config).__name__
            raise ValidationError(f"config: expected a FinetuningConfig or a dict, not {kind}")
        try:
            config = FinetuningConfig.model_validate(dict(config))
        except pydantic.ValidationError as exc:
            if continuing and all(not item["loc"] for item in exc.errors()):
                return _JSON_PARAMS.dump_python(dict(config), mode="json")
            raise ValidationError(f"invalid fine-tuning config: {config_error_text(exc)}") from None
    params = config.model_dump(mode="json", exclude_unset=True)
    # Always sent when known: a config built with model_construct() may not count base_model as set.
    if config.base_model is not None:
        params["base_model"] = config.base_model
    elif not continuing:
        raise ValidationError(
            "invalid fine-tuning config: base_model: required; name a base model, or continue from an "
            "adapter version (continue_from_version) to train on its base model"
        )
    else:
        params.pop("base_model", None)
    return params


def config_error_text(error: pydantic.ValidationError) -> str:
    """pydantic's errors as `field: message; ...`, the way the server words a 422."""
    return "; ".join(f"{field}: {message}" if field else message for field, message in config_errors(error))


class FinetuningJobs:
    """Job calls with the Predibase SDK's shapes: `create`, `get`, `watch`, `cancel`, plus `list`, ..."""

    def __init__(self, http: HttpTransport, *, poll_interval: float = 1.0) -> None:
        self._http = http
        self._watcher = JobWatcher(http, poll_interval=poll_interval)

    def create(
        self,
        *,
        config: ConfigLike,
        dataset: str | Dataset,
        repo: RepoRef,
        description: str | None = None,
        continue_from_version: str | AdapterVersion | None = None,
        watch: bool = False,
        show_progress: bool = True,
    ) -> FinetuningJob:
        """Start training `config` on `dataset` into the repo's next version (`repo/N`).

        `dataset` is a name, `connection/name`, uuid or Dataset; `repo` a name or Repo.
        `continue_from_version` (`repo/tag`, or a checkpoint `repo/tag@step`) starts from that
        adapter's weights, and its config supplies every field `config` leaves out (base_model
        included). With `watch=True` this blocks like `watch()` and returns the final job, whatever
        its status; otherwise it returns the queued job at once. Raises ValidationError for a bad
        config before sending.
        """
        body = {
            "params": finetuning_params(config, continuing=continue_from_version is not None),
            "dataset": dataset.uuid if isinstance(dataset, Dataset) else dataset,
            "repo": repo_name(repo),
            "description": description,
            "continueFromVersion": _version_id(continue_from_version),
        }
        job = FinetuningJob.model_validate(self._http.api("POST", "/v2/finetuning/jobs", json=body))
        if show_progress:
            print(f"Fine-tuning {job.base_model} into {job.adapter_id} (job {job.uuid}).", file=sys.stderr)
        return self.watch(job, show_progress=show_progress) if watch else job

    def get(self, job_ref: JobRef) -> FinetuningJob:
        """One job by uuid (or a FinetuningJob, refreshed)."""
        return FinetuningJob.model_validate(self._http.api("GET", self._path(job_ref)))

    def list(self, limit: int = 100, offset: int = 0) -> builtins.list[FinetuningJob]:
        """This tenant's jobs, newest first."""
        body = self._http.api("GET", "/v2/finetuning/jobs", params={"limit": limit, "offset": offset})
        return [FinetuningJob.model_validate(item) for item in body["data"]]

    def watch(self, job_ref: JobRef, *, show_progress: bool = True) -> FinetuningJob:
        """Block until the job is completed, errored or canceled, with a live progress bar; return it.

        The bar shows the status, steps done/total and the latest train and eval losses. Ctrl-C
        stops watching but not the job: how to re-attach or cancel is printed, and the
        KeyboardInterrupt is re-raised. An errored job is returned, not raised: call its `raise_for_status()`.
        """
        return self._watcher.watch(_job_uuid(job_ref), show_progress=show_progress)

    def cancel(self, job_ref: JobRef) -> FinetuningJob:
        """Ask the job to stop (honoured within one training step); returns it, usually `stopping`.

        Raises ConflictError when the job has already ended.
        """
        return FinetuningJob.model_validate(self._http.api("POST", self._path(job_ref) + "/cancel"))

    def timeline(self, job_ref: JobRef) -> dict[str, JobPhase]:
        """When the job entered each status it has been in, keyed by status."""
        body = self._http.api("GET", self._path(job_ref) + "/timeline")
        return {status: JobPhase.model_validate(phase or {}) for status, phase in body.items()}

    def metrics(self, job_ref: JobRef) -> builtins.list[JobMetric]:
        """Every step's recorded metrics (losses, learning rate, tokens), in step order."""
        body = self._http.api("GET", self._path(job_ref) + "/metrics")
        return [JobMetric.model_validate(item) for item in body["data"]]

    @staticmethod
    def _path(job_ref: JobRef) -> str:
        return f"/v2/finetuning/jobs/{path_segment(_job_uuid(job_ref))}"


class Finetuning:
    """The `finetuning` namespace; its calls live in `jobs`, as in the Predibase SDK."""

    def __init__(self, http: HttpTransport, *, poll_interval: float = 1.0) -> None:
        self.jobs = FinetuningJobs(http, poll_interval=poll_interval)


def _job_uuid(job_ref: JobRef) -> str:
    return job_ref.uuid if isinstance(job_ref, FinetuningJob) else job_ref


def _version_id(version: str | AdapterVersion | None) -> str | None:
    """`repo/tag` or `repo/tag@step` checked locally, so a malformed id fails before a job is created."""
    if version is None:
        return None
    repo, tag, step = parse_version_ref(version)
    return f"{repo}/{tag}" + (f"@{step}" if step is not None else "")
