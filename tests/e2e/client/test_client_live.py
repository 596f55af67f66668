"""The thin client against a real server over HTTP, on both stacks (embedded, Postgres + S3)."""

from __future__ import annotations

import json
import socket
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from tests_support import write_peft_adapter
from tuneforge import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    Predibase,
    ServerError,
    ServerUnreachableError,
    Tuneforge,
    TuneforgeError,
    ValidationError,
)

pytestmark = pytest.mark.e2e

CSV = "prompt,completion,split\nWhat is 2+2?,4,train\nCapital of France?,Paris,train\nHi,Hello,evaluation\n"
JSONL = '{"prompt": "hi", "completion": "hello"}\n{"prompt": "bye", "completion": "goodbye"}\n'


@pytest.fixture
def pb(live_server, live_token: str) -> Iterator[Tuneforge]:  # type: ignore[no-untyped-def]
    with Tuneforge(api_token=live_token, base_url=live_server.url, poll_interval=0.2) as client:
        yield client


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- datasets --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file_name", "text", "rows", "splits"),
    [("qa.csv", CSV, 3, {"train": 2, "evaluation": 1}), ("qa.jsonl", JSONL, 2, {"train": 2})],
    ids=["csv", "jsonl"],
)
def test_from_file_waits_until_connected_with_row_count(
    pb: Tuneforge, tmp_path: Path, file_name: str, text: str, rows: int, splits: dict[str, int]
) -> None:
    path = tmp_path / file_name
    path.write_text(text)
    dataset = pb.datasets.from_file(path, name="qa")
    assert (dataset.name, dataset.status, dataset.last_error) == ("qa", "connected", None)
    assert dataset.format == "prompt_completion" and dataset.row_count == rows
    assert dataset.split_counts == splits
    assert dataset.connection_name == "file_uploads" and dataset.size_bytes == len(text.encode())
    assert dataset.preview and dataset.preview[0]["prompt"]


def test_from_file_names_the_dataset_after_the_file_stem(pb: Tuneforge, tmp_path: Path) -> None:
    path = tmp_path / "my training data.csv"
    path.write_text(CSV)
    assert pb.datasets.from_file(path).name == "my-training-data"


def test_bad_file_raises_validation_error_with_the_servers_message(pb: Tuneforge, tmp_path: Path) -> None:
    path = tmp_path / "wrong.csv"
    path.write_text("question,answer\nq,a\n")
    with pytest.raises(ValidationError, match="found columns") as caught:
        pb.datasets.from_file(path, name="wrong")
    assert "wrong" in caught.value.message
    assert pb.datasets.get("wrong").status == "errored"  # recorded server-side, not a client guess


def test_duplicate_dataset_name_is_a_conflict(pb: Tuneforge, tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text(CSV)
    pb.datasets.from_file(path, name="same")
    with pytest.raises(ConflictError, match="already exists") as caught:
        pb.datasets.from_file(path, name="same")
    assert caught.value.status == 409


def test_dataset_get_list_download_delete(pb: Tuneforge, tmp_path: Path) -> None:
    path = tmp_path / "qa.csv"
    path.write_text(CSV)
    created = pb.datasets.from_file(path, name="qa")
    for ref in ("qa", "file_uploads/qa", created.uuid, created):
        assert pb.datasets.get(ref).uuid == created.uuid
    assert [d.name for d in pb.datasets.list()] == ["qa"]

    downloaded = pb.datasets.download("qa", tmp_path / "out")
    assert downloaded == tmp_path / "out.csv" and downloaded.read_text() == CSV
    (tmp_path / "dir").mkdir()
    assert pb.datasets.download(created, tmp_path / "dir").name == "qa.csv"

    pb.datasets.delete("qa")
    with pytest.raises(NotFoundError):
        pb.datasets.get("qa")
    assert pb.datasets.list() == []


def test_from_pandas_dataframe_keeps_nested_messages(pb: Tuneforge) -> None:
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    dataset = pb.datasets.from_pandas_dataframe(pd.DataFrame({"messages": [chat, chat]}), name="chat")
    assert (dataset.status, dataset.format, dataset.row_count) == ("connected", "messages", 2)


# --- repos -----------------------------------------------------------------------------------------


def test_repo_create_get_list_delete(pb: Tuneforge) -> None:
    repo = pb.repos.create("dates", description="date rewriting")
    assert (repo.name, repo.description, repo.versions) == ("dates", "date rewriting", [])
    assert pb.repos.get("dates").uuid == repo.uuid == pb.repos.get(repo.uuid).uuid
    pb.repos.create("other")
    assert {r.name for r in pb.repos.list(limit=10)} == {"dates", "other"}
    assert len(pb.repos.list(limit=1)) == 1

    pb.repos.delete(repo)
    with pytest.raises(NotFoundError):
        pb.repos.get("dates")


def test_repo_create_twice_conflicts_unless_exists_ok(pb: Tuneforge) -> None:
    first = pb.repos.create("r")
    with pytest.raises(ConflictError, match="already exists") as caught:
        pb.repos.create("r")
    assert isinstance(caught.value, ValidationError) and caught.value.status == 409
    assert pb.repos.create("r", exists_ok=True).uuid == first.uuid


def test_invalid_repo_name_is_a_validation_error_naming_the_field(pb: Tuneforge) -> None:
    with pytest.raises(ValidationError, match="name: must not contain spaces") as caught:
        pb.repos.create("my repo")
    assert caught.value.status == 422


def test_missing_repo_raises_not_found(pb: Tuneforge) -> None:
    with pytest.raises(NotFoundError, match="not found") as caught:
        pb.repos.get("nope")
    assert caught.value.status == 404
    with pytest.raises(NotFoundError):
        pb.adapters.get("nope/1")


# --- adapters --------------------------------------------------------------------------------------


def test_adapter_upload_get_download_archive_delete(pb: Tuneforge, tmp_path: Path) -> None:
    directory = write_peft_adapter(tmp_path / "adapter")
    version = pb.adapters.upload(directory, repo="uploaded")
    assert (version.id, version.status) == ("uploaded/1", "completed")
    assert version.base_model == "tiny-random-llama"
    assert version.adapter_path == "uploaded/1" and version.finetuning_job.uuid is None

    assert pb.adapters.get("uploaded/1").uuid == version.uuid
    assert [v.id for v in pb.adapters.list("uploaded")] == ["uploaded/1"]
    with pytest.raises(ValidationError, match="uploaded, not trained"):
        pb.adapters.get_config("uploaded/1")

    archive = pb.adapters.download("uploaded/1", tmp_path)
    assert archive == tmp_path / "uploaded-1.zip"
    with zipfile.ZipFile(archive) as zipped:
        assert {name: zipped.read(name) for name in zipped.namelist()} == {
            p.name: p.read_bytes() for p in directory.iterdir()
        }

    assert pb.adapters.archive("uploaded/1").archived is True
    assert pb.repos.get("uploaded").versions[0].archived is True
    assert pb.adapters.unarchive(version).archived is False

    pb.adapters.delete("uploaded/1")
    with pytest.raises(NotFoundError):
        pb.adapters.get("uploaded/1")
    assert pb.adapters.upload(directory, repo="uploaded").tag == 2  # tags are never reused


def test_adapter_upload_refuses_a_pickle_only_directory_before_sending(pb: Tuneforge, tmp_path: Path) -> None:
    directory = write_peft_adapter(tmp_path / "adapter")
    (directory / "adapter_model.safetensors").rename(directory / "adapter_model.bin")
    with pytest.raises(ValidationError, match="pickle"):
        pb.adapters.upload(directory, repo="pickled")
    with pytest.raises(NotFoundError):  # nothing reached the server: not even the repo was created
        pb.repos.get("pickled")


def test_server_side_adapter_check_surfaces_as_validation_error(pb: Tuneforge, tmp_path: Path) -> None:
    directory = write_peft_adapter(tmp_path / "adapter")
    config = json.loads((directory / "adapter_config.json").read_text())
    del config["base_model_name_or_path"]
    (directory / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValidationError, match="base_model_name_or_path") as caught:
        pb.adapters.upload(directory, repo="r")
    assert caught.value.status == 422


def test_malformed_adapter_id_is_refused_locally(pb: Tuneforge) -> None:
    for bad in ("repo", "repo/latest", "repo/0", "/1"):
        with pytest.raises(ValidationError, match="expected '<repo>/<version>'"):
            pb.adapters.get(bad)


# --- auth, environment, network --------------------------------------------------------------------


def test_bad_token_raises_authentication_error(live_server) -> None:  # type: ignore[no-untyped-def]
    client = Tuneforge(api_token="pb_not-a-real-token", base_url=live_server.url)
    with client, pytest.raises(AuthenticationError) as caught:
        client.repos.list()
    assert caught.value.status == 401 and caught.value.message


def test_predibase_alias_reads_the_sdk_environment(live_server, live_token, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for name in ("TUNEFORGE_API_TOKEN", "TUNEFORGE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREDIBASE_API_TOKEN", live_token)
    monkeypatch.setenv("PREDIBASE_GATEWAY", live_server.url + "/v2/")
    with Predibase() as client:
        assert client.base_url == live_server.url
        assert client.repos.create("via-env").name == "via-env"


def test_missing_token_is_refused_before_any_request(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    for name in ("TUNEFORGE_API_TOKEN", "PREDIBASE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(AuthenticationError, match="TUNEFORGE_API_TOKEN"):
        Tuneforge(base_url="http://127.0.0.1:1")


def test_closed_port_raises_server_unreachable_after_retrying_idempotent_calls() -> None:
    with Tuneforge(api_token="pb_x", base_url=f"http://127.0.0.1:{_free_port()}") as client:
        with pytest.raises(ServerUnreachableError, match="after 4 attempts") as caught:
            client.repos.list()
        assert isinstance(caught.value, ConnectionError) and caught.value.status is None
        # A POST is never retried: it might have created something before the connection dropped.
        with pytest.raises(ServerUnreachableError) as caught:
            client.repos.create("r")
        assert "attempts" not in caught.value.message


class _FlakyHandler(BaseHTTPRequestHandler):
    """Answers `status` (plain text, like a proxy) to the first `failures` requests, then a repo list."""

    failures = 0
    status = 503
    seen: list[str] = []

    def _answer(self) -> None:
        type(self).seen.append(self.command)
        if len(type(self).seen) <= type(self).failures:
            body, status, kind = b"<html>upstream not ready</html>", type(self).status, "text/html"
        else:
            body, status, kind = b'{"data": {"repos": [], "count": 0}}', 200, "application/json"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky_server() -> Iterator[tuple[str, type[_FlakyHandler]]]:
    handler = type("Flaky", (_FlakyHandler,), {"failures": 2, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_503_is_retried_for_get_but_not_for_post(flaky_server) -> None:  # type: ignore[no-untyped-def]
    url, handler = flaky_server
    with Tuneforge(api_token="pb_x", base_url=url) as client:
        assert client.repos.list() == []
        assert handler.seen == ["GET", "GET", "GET"]
        handler.seen.clear()
        with pytest.raises(ServerError, match="upstream not ready") as caught:
            client.repos.create("r")
    assert caught.value.status == 503 and handler.seen == ["POST"]
    assert isinstance(caught.value, TuneforgeError)


@pytest.mark.parametrize(("status", "attempts"), [(429, 3), (500, 1), (502, 1)])
def test_only_429_and_503_are_retried(flaky_server, status: int, attempts: int) -> None:  # type: ignore[no-untyped-def]
    url, handler = flaky_server
    handler.status = status
    with Tuneforge(api_token="pb_x", base_url=url) as client:
        if attempts > 1:
            assert client.repos.list() == []  # the server asked to slow down: waited and retried
        else:
            with pytest.raises(ServerError, match="upstream not ready"):  # failed while processing it
                client.repos.list()
    assert handler.seen == ["GET"] * attempts
