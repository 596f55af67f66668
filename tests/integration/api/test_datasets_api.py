"""The Predibase dataset upload flow end to end through the API, with validation after upload."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tests_support import assert_error

CSV = b"prompt,completion,split\nWhat is 2+2?,4,train\nCapital of France?,Paris,evaluation\n"
JSONL = b'{"prompt": "hi", "completion": "hello"}\n{"prompt": "bye", "completion": "goodbye"}\n'


def _parquet() -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table({"text": ["one document", "another document", "a third"]}), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("file_name", "data", "fmt", "rows"),
    [
        ("qa.csv", CSV, "prompt_completion", 2),
        ("qa.jsonl", JSONL, "prompt_completion", 2),
        (
            "chat.json",
            json.dumps(
                [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}]
            ).encode(),
            "messages",
            1,
        ),
        ("corpus.parquet", _parquet(), "text", 3),
    ],
)
def test_upload_validates_and_connects(tenant, file_name: str, data: bytes, fmt: str, rows: int) -> None:
    body = tenant.upload_dataset("ds", file_name, data)
    assert body["status"] == "connected", body
    assert body["lastError"] is None
    assert body["format"] == fmt and body["rowCount"] == rows
    assert body["connection"] == {"type": "file", "name": "file_uploads"}
    assert body["sizeBytes"] == len(data) and len(body["sha256"]) == 64
    assert body["preview"]


def test_split_counts_are_recorded(tenant) -> None:
    body = tenant.upload_dataset("split", "s.csv", CSV)
    assert body["splitCounts"] == {"train": 1, "evaluation": 1}


@pytest.mark.parametrize(
    ("file_name", "data", "fragment"),
    [
        ("empty.csv", b"", "empty"),
        ("latin1.csv", "prompt,completion\ncafé,crème\n".encode("latin-1"), "utf-8"),
        ("broken.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": oops}\n', "line 2"),
        ("wrong.csv", b"question,answer\nq,a\n", "found columns"),
        ("blank.csv", b"prompt,completion\nq1,a1\nq2,\n", "empty 'completion'"),
    ],
)
def test_bad_files_end_errored_with_last_error(tenant, file_name: str, data: bytes, fragment: str) -> None:
    body = tenant.upload_dataset("bad", file_name, data)
    assert body["status"] == "errored"
    assert fragment.lower() in body["lastError"].lower(), body["lastError"]


def test_unsupported_extension_is_422_naming_file_name(tenant) -> None:
    response = tenant.client.post("/v2/datasets/upload", json={"fileName": "notes.docx", "mimeType": "x"})
    assert_error(response, 422, "fileName")


def test_finish_without_uploading_bytes_is_422(tenant) -> None:
    token = tenant.client.post("/v2/datasets/upload", json={"fileName": "a.csv"}).json()["uploadToken"]
    assert_error(
        tenant.client.put("/v2/datasets/upload", json={"name": "a", "uploadToken": token}),
        422,
        "PUT the file",
    )


def test_forged_upload_token_is_422(tenant) -> None:
    response = tenant.client.put("/v2/datasets/upload", json={"name": "a", "uploadToken": "abc.def"})
    assert_error(response, 422, "uploadToken")


def test_upload_token_of_another_tenant_is_rejected(tenant, other_tenant) -> None:
    begun = tenant.client.post("/v2/datasets/upload", json={"fileName": "a.csv"}).json()
    tenant.put_presigned(begun["presignedUrl"], CSV).raise_for_status()
    response = other_tenant.client.put(
        "/v2/datasets/upload", json={"name": "a", "uploadToken": begun["uploadToken"]}
    )
    assert_error(response, 422, "uploadToken")


def test_duplicate_name_is_409(tenant) -> None:
    tenant.upload_dataset("same", "a.csv", CSV)
    begun = tenant.client.post("/v2/datasets/upload", json={"fileName": "b.csv"}).json()
    tenant.put_presigned(begun["presignedUrl"], CSV).raise_for_status()
    response = tenant.client.put(
        "/v2/datasets/upload", json={"name": "same", "uploadToken": begun["uploadToken"]}
    )
    assert_error(response, 409, "already exists")


@pytest.mark.parametrize("name", ["../etc", "a/b", "with space", "x" * 65, ""])
def test_invalid_dataset_names_are_422(tenant, name: str) -> None:
    begun = tenant.client.post("/v2/datasets/upload", json={"fileName": "a.csv"}).json()
    tenant.put_presigned(begun["presignedUrl"], CSV).raise_for_status()
    response = tenant.client.put(
        "/v2/datasets/upload", json={"name": name, "uploadToken": begun["uploadToken"]}
    )
    assert_error(response, 422, "name:")


def test_download_link_returns_the_same_bytes(tenant) -> None:
    body = tenant.upload_dataset("dl", "qa.csv", CSV)
    link = tenant.client.get(f"/v2/datasets/{body['uuid']}/download-link").json()
    assert link["fileExtension"] == "csv"
    downloaded = tenant.get_presigned(link["url"])
    assert downloaded.status_code == 200 and downloaded.content == CSV


def test_list_get_and_delete(tenant) -> None:
    body = tenant.upload_dataset("gone", "qa.csv", CSV)
    listed = tenant.client.get("/v2/datasets").json()
    assert listed["count"] == 1 and listed["data"][0]["name"] == "gone"
    assert tenant.client.get(f"/v2/datasets/{body['uuid']}").json()["name"] == "gone"
    assert tenant.client.delete("/v2/datasets/gone").status_code == 200
    assert_error(tenant.client.get("/v1/datasets/name/gone"), 404, "not found")


def test_another_tenants_dataset_is_404_and_untouched(tenant, other_tenant) -> None:
    body = tenant.upload_dataset("secret", "qa.csv", CSV)
    for path in (
        f"/v2/datasets/{body['uuid']}",
        "/v1/datasets/name/secret",
        f"/v2/datasets/{body['uuid']}/download-link",
    ):
        assert_error(other_tenant.client.get(path), 404, "not found")
    assert_error(other_tenant.client.delete(f"/v2/datasets/{body['uuid']}"), 404, "not found")
    assert tenant.client.get("/v1/datasets/name/secret").json()["status"] == "connected"


def test_repeating_the_finish_step_returns_the_same_dataset(tenant) -> None:
    begun = tenant.client.post("/v2/datasets/upload", json={"fileName": "a.csv"}).json()
    tenant.put_presigned(begun["presignedUrl"], CSV).raise_for_status()
    body = {"name": "once", "uploadToken": begun["uploadToken"]}
    first, second = (tenant.client.put("/v2/datasets/upload", json=body) for _ in range(2))
    assert first.status_code == second.status_code == 200
    assert first.json()["uuid"] == second.json()["uuid"]
