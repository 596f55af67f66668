"""`client.adapters`: adapter versions `repo/tag`: train, get, list, upload, download, export, archive,
delete."""

from __future__ import annotations

import builtins
import time
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge._http import HttpTransport, path_segment
from tuneforge.adapter_ids import AdapterRef, parse_adapter_id
from tuneforge.config import FinetuningConfig
from tuneforge.errors import TuneforgeError, ValidationError
from tuneforge.models import AdapterVersion, Dataset, FinetuningJob, VersionSummary
from tuneforge.repos import RepoRef, Repos, repo_name
from tuneforge.rules.artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PICKLED_WEIGHTS

if TYPE_CHECKING:
    # Only for annotations: finetuning builds on this module's calls.
    from tuneforge.finetuning import ConfigLike, FinetuningJobs


# A merge loads the base model on a worker that may be training: allow it time.
DEFAULT_EXPORT_WAIT_SECONDS = 3600.0


class Adapters:
    """Adapter calls with the Predibase SDK's shapes: `create`, `get`, `get_config`, `list`, `upload`,
    `download`, `archive`, `unarchive`, `delete`, `cancel`."""

    def __init__(
        self, http: HttpTransport, repos: Repos, jobs: FinetuningJobs, *, poll_interval: float = 1.0
    ) -> None:
        self._http = http
        self._repos = repos
        self._jobs = jobs
        self._poll_interval = poll_interval

    def create(
        self,
        *,
        config: ConfigLike,
        dataset: str | Dataset,
        repo: RepoRef,
        description: str | None = None,
        continue_from_version: str | AdapterVersion | None = None,
        wait: bool = True,
        show_progress: bool = True,
    ) -> AdapterVersion:
        """Train a new adapter version `repo/N` on `dataset` and return it.

        `config` is a FinetuningConfig or a dict (validated locally first: a bad field raises
        ValidationError naming it, before any request). With `wait=True` this blocks with a live
        progress bar (steps done/total, train and eval loss) and returns the completed version;
        an errored job raises FinetuningError with the job's error, a canceled one
        FinetuningCanceledError. Ctrl-C stops waiting, not training: how to re-attach and how to
        cancel are printed. With `wait=False` the queued version is returned at once.
        `continue_from_version` (`repo/tag` or a checkpoint `repo/tag@step`) trains on from that
        adapter; `config` then needs only what changes, as the rest (base model included) is its.
        """
        job = self._jobs.create(
            config=config,
            dataset=dataset,
            repo=repo,
            description=description,
            continue_from_version=continue_from_version,
            show_progress=show_progress,
        )
        if wait:
            self._jobs.watch(job, show_progress=show_progress).raise_for_status()
        return self.get(job.adapter_id)

    def cancel(self, adapter_id: AdapterRef) -> FinetuningJob:
        """Cancel the job training this version; returns the job. ConflictError if it already ended."""
        version = self.get(adapter_id)
        if version.finetuning_job.uuid is None:
            raise ValidationError(f"adapter {version.id} was uploaded, not trained: it has no job to cancel")
        return self._jobs.cancel(version.finetuning_job.uuid)

    def get_config(self, adapter_id: AdapterRef) -> FinetuningConfig:
        """The fine-tuning config the version was trained with, as the worker resolved it.

        Fields this client does not know (recorded by a newer server) are left out. Raises
        ValidationError for an uploaded adapter, which was not trained here and has no such config.
        """
        version = self.get(adapter_id)
        if version.finetuning_job.uuid is None:
            raise ValidationError(
                f"adapter {version.id} was uploaded, not trained: it has no fine-tuning config"
            )
        known = {key: value for key, value in version.config.items() if key in FinetuningConfig.model_fields}
        return FinetuningConfig.model_validate(known)

    def get(self, adapter_id: AdapterRef) -> AdapterVersion:
        """One adapter version, e.g. `get("my-repo/3")`."""
        return AdapterVersion.model_validate(self._http.api("GET", self._path(adapter_id)))

    def list(self, repo: RepoRef) -> builtins.list[VersionSummary]:
        """The versions of a repo, as summaries whose `.id` is the `repo/tag` other calls take."""
        return self._repos.get(repo).versions

    def upload(self, local_dir: str | PathLike[str], repo: RepoRef) -> AdapterVersion:
        """Upload a PEFT adapter directory (what `save_pretrained` wrote) as the repo's next version.

        The repo is created if it does not exist. Needs `adapter_config.json` (with `peft_type`
        and `base_model_name_or_path`) and `adapter_model.safetensors`; a pickled
        `adapter_model.bin` is refused before anything is sent, as the server never loads pickles.
        """
        directory = Path(local_dir)
        files = _adapter_files(directory)
        begun = self._http.api("POST", "/v2/adapters/upload", json={"repo": repo_name(repo)})
        urls: dict[str, str] = begun["presignedUrls"]
        for file_name, path in files.items():
            self._http.put_file(urls[file_name], path)
        # A PUT on the wire that publishes a new version; the server discards the staged files
        # either way, so a blind retry could only fail confusingly.
        body = self._http.api(
            "PUT", "/v2/adapters/upload", json={"uploadToken": begun["uploadToken"]}, idempotent=False
        )
        return AdapterVersion.model_validate(body)

    def download(self, adapter_id: AdapterRef, dest: str | PathLike[str] | None = None) -> Path:
        """Download the adapter's files as a zip; returns the path written.

        `dest` defaults to `<repo>-<tag>.zip` in the current directory; a directory gets that
        file name inside it.
        """
        repo, tag = parse_adapter_id(adapter_id)
        target = Path(dest) if dest is not None else Path.cwd()
        if target.is_dir():
            target = target / f"{repo}-{tag}.zip"
        return self._http.download_api(self._path(adapter_id) + "/download", target)

    def export(
        self,
        adapter_id: AdapterRef,
        dest: str | PathLike[str] | None = None,
        *,
        merged: bool = True,
        wait: bool = True,
        timeout: float = DEFAULT_EXPORT_WAIT_SECONDS,
    ) -> dict[str, Any]:
        """Export the version as a standard Hugging Face model directory (zip), its adapter merged into its
        base model (a full / last_layer version: its own whole model); loads with
        `AutoModelForCausalLM.from_pretrained` and needs no PEFT.

        The export runs on a training worker and is kept: asking again returns it. With `wait=True` this
        waits for it (up to `timeout` seconds) and downloads the zip to `dest` (default
        `<repo>-<tag>-merged.zip` here; a directory gets that name inside it), returning the export record
        with `path` added; with `wait=False` it returns the record (`status`: queued, running, completed,
        errored) at once. An errored export raises TuneforgeError with its error.
        """
        if not merged:
            raise ValidationError("merged: only merged exports exist (a standard HF model); pass merged=True")
        record: dict[str, Any] = self._http.api("POST", self._path(adapter_id) + "/export")
        if not wait:
            return record
        record = self._wait_for_export(adapter_id, record, timeout)
        repo, tag = parse_adapter_id(adapter_id)
        target = Path(dest) if dest is not None else Path.cwd()
        if target.is_dir():
            target = target / f"{repo}-{tag}-merged.zip"
        path = self._http.download_api(self._path(adapter_id) + "/export/download", target)
        return {**record, "path": str(path)}

    def export_status(self, adapter_id: AdapterRef) -> dict[str, Any]:
        """The version's export record (`status` is `none` until one is asked for)."""
        record: dict[str, Any] = self._http.api("GET", self._path(adapter_id) + "/export")
        return record

    def _wait_for_export(
        self, adapter_id: AdapterRef, record: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        interval = min(0.2, self._poll_interval)
        while record["status"] in ("queued", "running"):
            if time.monotonic() >= deadline:
                raise TuneforgeError(
                    f"the export of {adapter_id} is still {record['status']} after {timeout:.0f}s; check it "
                    "later with adapters.export_status()"
                )
            time.sleep(interval)
            interval = min(interval * 1.5, self._poll_interval)
            record = self.export_status(adapter_id)
        if record["status"] != "completed":
            raise TuneforgeError(f"the export of {adapter_id} {record['status']}: {record.get('error')}")
        return record

    def archive(self, adapter_id: AdapterRef) -> AdapterVersion:
        """Mark the version archived (hidden from default views, still downloadable)."""
        return self._set_archived(adapter_id, True)

    def unarchive(self, adapter_id: AdapterRef) -> AdapterVersion:
        """Undo `archive`."""
        return self._set_archived(adapter_id, False)

    def delete(self, adapter_id: AdapterRef) -> None:
        """Delete the version and its files; its tag is never reused. ConflictError while training."""
        self._http.api("DELETE", self._path(adapter_id))

    def _set_archived(self, adapter_id: AdapterRef, archived: bool) -> AdapterVersion:
        body = self._http.api("PUT", self._path(adapter_id), json={"archived": archived})
        return AdapterVersion.model_validate(body)

    @staticmethod
    def _path(adapter_id: AdapterRef) -> str:
        repo, tag = parse_adapter_id(adapter_id)
        return f"/v2/repos/{path_segment(repo)}/version/{tag}"


def _adapter_files(directory: Path) -> dict[str, Path]:
    """The files to send, checked the way the server will check them, so a bad upload fails fast."""
    if not directory.is_dir():
        raise ValidationError(f"{directory} does not exist or is not a directory")
    config, weights, pickle = (directory / n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PICKLED_WEIGHTS))
    if not config.is_file():
        raise ValidationError(
            f"{ADAPTER_CONFIG}: missing from {directory}; upload what save_pretrained wrote"
        )
    if not weights.is_file():
        if pickle.is_file():
            raise ValidationError(
                f"{PICKLED_WEIGHTS} is a pickle file, which tuneforge never loads (unpickling can run "
                "arbitrary code). Convert it with `PeftModel.from_pretrained(...).save_pretrained(dir, "
                f"safe_serialization=True)` and upload {ADAPTER_WEIGHTS}"
            )
        raise ValidationError(
            f"{ADAPTER_WEIGHTS}: missing from {directory}; save the adapter in safetensors format"
        )
    # The pickle file, if present next to the safetensors, is deliberately not sent.
    return {ADAPTER_CONFIG: config, ADAPTER_WEIGHTS: weights}
