"""`client.datasets`: upload a file or DataFrame, wait for validation, look up, list, download, delete."""

from __future__ import annotations

import builtins
import mimetypes
import re
import secrets
import tempfile
import time
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge._http import HttpTransport, path_segment
from tuneforge.errors import TuneforgeError, ValidationError
from tuneforge.models import Dataset

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_CONNECTION = "file_uploads"
DEFAULT_WAIT_SECONDS = 600.0
# mimetypes does not know the line-delimited JSON and Parquet extensions.
_MIME_TYPES = {
    ".jsonl": "application/jsonl",
    ".ndjson": "application/x-ndjson",
    ".parquet": "application/vnd.apache.parquet",
    ".pq": "application/vnd.apache.parquet",
}
_NAME_MAX = 64
_NAME_INVALID = re.compile(r"[^A-Za-z0-9._-]+")

DatasetRef = str | Dataset


class Datasets:
    """Dataset calls with the Predibase SDK's shapes: `from_file`, `from_pandas_dataframe`, `get`, ..."""

    def __init__(self, http: HttpTransport, *, poll_interval: float = 1.0) -> None:
        self._http = http
        self._poll_interval = poll_interval

    def from_file(
        self,
        file_path: str | PathLike[str],
        *,
        name: str | None = None,
        timeout: float = DEFAULT_WAIT_SECONDS,
    ) -> Dataset:
        """Upload a CSV, JSON Lines, JSON or Parquet file and wait until the server has validated it.

        The file is streamed, never read into memory. `name` defaults to the file's stem (made
        URL-safe). Returns the `connected` dataset with its row count, format, splits and preview;
        raises ValidationError with the server's message if the file cannot be trained on, and
        TuneforgeError if validation takes longer than `timeout` seconds.
        """
        path = Path(file_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist or is not a file")
        name = name if name is not None else _default_name(path.stem)
        mime_type = _mime_type(path)
        # Declaring the size lets an S3-backed server hand out a direct URL bound to it (no relay).
        begun = self._http.api(
            "POST",
            "/v2/datasets/upload",
            json={"fileName": path.name, "mimeType": mime_type, "sizeBytes": path.stat().st_size},
        )
        # The server answers with an S3 presigned URL or with its own /blobs URL; both take a plain PUT.
        self._http.put_file(begun["presignedUrl"], path, content_type=mime_type)
        # A PUT on the wire, but it creates the dataset: a blind retry would answer "name taken".
        self._http.api(
            "PUT",
            "/v2/datasets/upload",
            json={"name": name, "uploadToken": begun["uploadToken"]},
            idempotent=False,
        )
        return self.wait_until_ready(f"{DEFAULT_CONNECTION}/{name}", timeout=timeout)

    def from_pandas_dataframe(
        self, df: pd.DataFrame, *, name: str | None = None, timeout: float = DEFAULT_WAIT_SECONDS
    ) -> Dataset:
        """Upload a pandas DataFrame (columns `prompt`/`completion`, `messages` or `text`) as a dataset.

        Sent as JSON Lines rather than CSV so that nested columns such as `messages` keep their
        structure. `name` defaults to `dataframe-<random>`.
        """
        try:
            import pandas  # noqa: F401  (only to fail with a clear message when it is missing)
        except ImportError as exc:
            raise ImportError("from_pandas_dataframe needs pandas: pip install pandas") from exc
        name = name if name is not None else f"dataframe-{secrets.token_hex(4)}"
        with tempfile.TemporaryDirectory(prefix="tuneforge-") as scratch:
            path = Path(scratch) / f"{_default_name(name)}.jsonl"
            df.to_json(path, orient="records", lines=True, force_ascii=False, date_format="iso")
            return self.from_file(path, name=name, timeout=timeout)

    def get(self, dataset_ref: DatasetRef) -> Dataset:
        """Look a dataset up by name, `connection/name`, uuid, or a Dataset (refreshed)."""
        if isinstance(dataset_ref, Dataset):
            return self._parse(self._http.api("GET", f"/v2/datasets/{path_segment(dataset_ref.uuid)}"))
        connection, _, name = dataset_ref.rpartition("/")
        if connection:
            # The Predibase SDK's lookup route; `connection/name` does not fit in one path segment.
            body = self._http.api(
                "GET", f"/v1/datasets/name/{path_segment(name)}", params={"connectionName": connection}
            )
            return self._parse(body)
        return self._parse(self._http.api("GET", f"/v2/datasets/{path_segment(dataset_ref)}"))

    def list(self, limit: int = 100, offset: int = 0) -> builtins.list[Dataset]:
        """This tenant's datasets, newest first."""
        body = self._http.api("GET", "/v2/datasets", params={"limit": limit, "offset": offset})
        return [self._parse(item) for item in body["data"]]

    def wait_until_ready(self, dataset_ref: DatasetRef, *, timeout: float = DEFAULT_WAIT_SECONDS) -> Dataset:
        """Poll until validation ends: return the `connected` dataset or raise ValidationError."""
        deadline = time.monotonic() + timeout
        interval = min(0.1, self._poll_interval)
        while True:
            dataset = self.get(dataset_ref)
            if dataset.last_error or dataset.status == "errored":
                raise ValidationError(
                    f"dataset {dataset.name!r} failed validation: {dataset.last_error or 'unknown error'}. "
                    f"Fix the file and upload it again (delete this one to reuse the name)"
                )
            if dataset.status == "connected":
                return dataset
            if time.monotonic() >= deadline:
                raise TuneforgeError(
                    f"dataset {dataset.name!r} is still {dataset.status} after {timeout:.0f}s; "
                    "check it later with datasets.get()"
                )
            time.sleep(interval)
            # Small files validate in well under a second: start fast, then back off.
            interval = min(interval * 1.5, self._poll_interval)

    def download(self, dataset_ref: DatasetRef, dest: str | PathLike[str]) -> Path:
        """Download the dataset's original file; returns the path written.

        `dest` may be a directory (the file is named after the dataset) or a file path; as in the
        Predibase SDK, the file's extension is appended when `dest` does not already end with it.
        """
        dataset = self.get(dataset_ref)
        link = self._http.api("GET", f"/v2/datasets/{path_segment(dataset.uuid)}/download-link")
        extension = link.get("fileExtension") or ""
        target = Path(dest)
        if target.is_dir():
            target = target / dataset.name
        if extension and target.suffix != f".{extension}":
            target = target.with_name(f"{target.name}.{extension}")
        return self._http.download_url(link["url"], target)

    def delete(self, dataset_ref: DatasetRef) -> None:
        """Delete the dataset and its stored file."""
        if isinstance(dataset_ref, str) and "/" not in dataset_ref:
            self._http.api("DELETE", f"/v2/datasets/{path_segment(dataset_ref)}")
            return
        uuid = self.get(dataset_ref).uuid
        self._http.api("DELETE", f"/v2/datasets/{path_segment(uuid)}")

    @staticmethod
    def _parse(body: dict[str, Any]) -> Dataset:
        return Dataset.model_validate(body)


def _mime_type(path: Path) -> str:
    suffix = path.suffix.lower()
    return _MIME_TYPES.get(suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def _default_name(stem: str) -> str:
    """A name the server accepts, derived from a file stem the user did not choose as a name."""
    cleaned = re.sub(r"\.{2,}", ".", _NAME_INVALID.sub("-", stem)).lstrip("._-")[:_NAME_MAX].rstrip("._-")
    return cleaned or f"dataset-{secrets.token_hex(4)}"
