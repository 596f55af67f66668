"""The Predibase dataset upload flow end to end through the API, with validation after upload."""

from __future__ import annotations

import hashlib
import io
import json
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from tests_support import assert_error

from app.db import Dataset
from app.storage import LocalBlobStore

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


# --- registered uploads are immutable, and every read checks their sha256 --------------------------


def _begin_and_put(tenant, file_name: str, data: bytes) -> dict:  # type: ignore[no-untyped-def, type-arg]
    begun = tenant.client.post("/v2/datasets/upload", json={"fileName": file_name}).json()
    tenant.put_presigned(begun["presignedUrl"], data).raise_for_status()
    return begun


def test_registration_records_the_sha256_of_the_uploaded_bytes(tenant) -> None:
    begun = _begin_and_put(tenant, "a.csv", CSV)
    finished = tenant.client.put(
        "/v2/datasets/upload", json={"name": "sealed", "uploadToken": begun["uploadToken"]}
    )
    assert finished.json()["sha256"] == hashlib.sha256(CSV).hexdigest()  # before validation ran
    assert tenant.wait_for_dataset("sealed")["sha256"] == hashlib.sha256(CSV).hexdigest()


def test_a_second_registration_of_one_upload_is_409_naming_the_first(tenant) -> None:
    begun = _begin_and_put(tenant, "a.csv", CSV)
    first = tenant.client.put(
        "/v2/datasets/upload", json={"name": "first", "uploadToken": begun["uploadToken"]}
    )
    assert first.status_code == 200
    second = tenant.client.put(
        "/v2/datasets/upload", json={"name": "second", "uploadToken": begun["uploadToken"]}
    )
    assert_error(second, 409, "already registered as dataset 'first'")
    assert tenant.client.get("/v2/datasets").json()["count"] == 1


def test_an_upload_stays_used_up_after_its_dataset_is_deleted(tenant) -> None:
    begun = _begin_and_put(tenant, "a.csv", CSV)
    body = {"name": "gone-soon", "uploadToken": begun["uploadToken"]}
    assert tenant.client.put("/v2/datasets/upload", json=body).status_code == 200
    assert tenant.client.delete("/v2/datasets/gone-soon").status_code == 200
    # The control plane's own upload URL is closed; a direct S3 URL would write only the upload key.
    assert_error(tenant.put_presigned(begun["presignedUrl"], CSV), 409, "already registered")
    again = tenant.client.put("/v2/datasets/upload", json=body | {"name": "revived"})
    assert_error(again, 409, "already registered (as a dataset since deleted)")


def test_bytes_changed_in_storage_after_registration_are_never_served(api_app, tenant) -> None:
    body = tenant.upload_dataset("tampered", "qa.csv", CSV)
    store = api_app.app.state.ctx.store
    with api_app.app.state.ctx.sessions() as session:
        key = session.scalar(select(Dataset.blob_key).where(Dataset.uuid == body["uuid"]))
    store.put_stream(key, [CSV.replace(b"Paris", b"Lyon!")])  # same size, other bytes
    assert_error(tenant.client.get(f"/v2/datasets/{body['uuid']}/download-link"), 409, "sha256")
    assert_error(tenant.client.get(f"/v2/datasets/{body['uuid']}/lengths"), 409, "sha256")


def test_bytes_replaced_behind_the_stores_back_are_never_delivered(api_app, tenant) -> None:
    body = tenant.upload_dataset("in-place", "qa.csv", CSV)
    link = tenant.client.get(f"/v2/datasets/{body['uuid']}/download-link").json()["url"]
    store = api_app.app.state.ctx.store
    with api_app.app.state.ctx.sessions() as session:
        key = session.scalar(select(Dataset.blob_key).where(Dataset.uuid == body["uuid"]))
    tampered = CSV.replace(b"prompt", b"PROMPT", 1)
    if isinstance(store, LocalBlobStore):
        (store.root / key).write_bytes(tampered)  # same inode: the recorded sidecar still matches
        # The last chunk is held back until the sha256 check passes; it fails, so the body ends short.
        response = TestClient(api_app.app, raise_server_exceptions=False).get(link)
        assert b"PROMPT" not in response.content and len(response.content) < len(CSV)
    else:  # S3 serves the link itself; a raw overwrite carries no sha256 of ours
        store._client.put_object(Bucket=store.bucket, Key=store.prefix + key, Body=tampered)
    assert_error(tenant.client.get(f"/v2/datasets/{body['uuid']}/lengths"), 409, "sha256")


@pytest.mark.parametrize(
    "file_name",
    ['we"ird; filename=evil.sh.csv', "ünï çødé 日本.csv", "semi;colon,comma'quote.csv", "x" * 240 + ".csv"],
)
def test_odd_file_names_are_served_with_an_encoded_content_disposition(tenant, file_name: str) -> None:
    body = tenant.upload_dataset("odd", file_name, CSV)
    assert body["status"] == "connected", body
    link = tenant.client.get(f"/v2/datasets/{body['uuid']}/download-link").json()["url"]
    downloaded = tenant.get_presigned(link)
    assert downloaded.status_code == 200 and downloaded.content == CSV
    header = downloaded.headers["content-disposition"]
    disposition, fallback, encoded = header.split("; ")
    assert disposition == "attachment" and fallback.startswith('filename="') and fallback.endswith('"')
    assert encoded.startswith("filename*=UTF-8''")
    assert unquote(header.split("filename*=UTF-8''", 1)[1]) == content_disposition_name(file_name)


def content_disposition_name(file_name: str) -> str:
    return file_name if len(file_name) <= 150 else file_name[:146] + ".csv"


@pytest.mark.parametrize("file_name", ["a\r\nb.csv", "tab\there.csv", "x" * 300 + ".csv", "\ud800.csv"])
def test_file_names_that_cannot_be_stored_are_422_naming_file_name(tenant, file_name: str) -> None:
    # json.dumps escapes the lone surrogate, as a hostile client would send it.
    body = json.dumps({"fileName": file_name})
    response = tenant.client.post(
        "/v2/datasets/upload", content=body, headers={"Content-Type": "application/json"}
    )
    assert_error(response, 422, "fileName")
