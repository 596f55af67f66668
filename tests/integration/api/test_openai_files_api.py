"""The official `openai` SDK's Files API against a live tuneforge: a file is a dataset."""

from __future__ import annotations

import io
import json

import httpx
import openai
import pytest

SFT_ROWS = [
    {"messages": [{"role": "user", "content": f"Say {word}"}, {"role": "assistant", "content": word}]}
    for word in ("red", "green", "blue", "cyan")
]


def jsonl(rows: list[dict[str, object]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.fixture
def client(live_server, live_token: str) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key=live_token, max_retries=0)


def upload(client: openai.OpenAI, data: bytes, name: str = "train.jsonl") -> openai.types.FileObject:
    return client.files.create(file=(name, io.BytesIO(data)), purpose="fine-tune")


def test_upload_answers_a_processed_file(client: openai.OpenAI) -> None:
    data = jsonl(SFT_ROWS)
    created = upload(client, data)
    assert created.id.startswith("file-") and created.object == "file"
    assert (created.status, created.purpose, created.filename) == ("processed", "fine-tune", "train.jsonl")
    assert created.bytes == len(data) and created.created_at > 0
    assert client.files.retrieve(created.id) == created
    assert client.files.content(created.id).content == data


def test_list_pages_through_the_files_newest_first(client: openai.OpenAI) -> None:
    ids = [upload(client, jsonl(SFT_ROWS), f"f{i}.jsonl").id for i in range(3)]
    first = client.files.list(limit=2)
    assert [f.id for f in first.data] == ids[:0:-1] and first.has_more
    assert [f.id for f in client.files.list(limit=2)] == ids[::-1]  # the SDK follows `after`
    assert [f.id for f in client.files.list(order="asc")] == ids
    assert [f.id for f in client.files.list(purpose="fine-tune", after=ids[2])] == ids[1::-1]
    assert client.files.list(purpose="batch").data == []


def test_delete_removes_the_file(client: openai.OpenAI) -> None:
    created = upload(client, jsonl(SFT_ROWS))
    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.deleted) == (created.id, True)
    with pytest.raises(openai.NotFoundError) as raised:
        client.files.retrieve(created.id)
    error = raised.value.body
    assert isinstance(error, dict) and error["type"] == "invalid_request_error"
    assert error["param"] == "file_id" and created.id in error["message"]
    assert client.files.list().data == []


def test_a_purpose_other_than_fine_tune_is_a_400_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.files.create(file=("b.jsonl", io.BytesIO(jsonl(SFT_ROWS))), purpose="batch")
    assert raised.value.body["param"] == "purpose"  # type: ignore[index]
    assert "fine-tune" in raised.value.message


def test_a_file_that_is_no_dataset_is_a_400_with_the_validation_message(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="columns") as raised:
        upload(client, jsonl([{"question": "q", "answer": "a"}]))
    assert raised.value.body["param"] == "file"  # type: ignore[index]
    assert client.files.list().data == []  # nothing was kept that the caller has no id for


def test_an_unsupported_extension_names_the_file(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="extension") as raised:
        upload(client, b"hello", "notes.txt")
    assert raised.value.body["param"] == "file"  # type: ignore[index]


def test_another_tenants_file_is_not_found(live_server, client: openai.OpenAI) -> None:  # type: ignore[no-untyped-def]
    created = upload(client, jsonl(SFT_ROWS))
    other = openai.OpenAI(
        base_url=live_server.url + "/v1", api_key=live_server.mint_token("t-other-files"), max_retries=0
    )
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(created.id)


def test_a_bad_token_is_openais_401(live_server) -> None:  # type: ignore[no-untyped-def]
    client = openai.OpenAI(base_url=live_server.url + "/v1", api_key="pb_not-a-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        client.files.list()
    assert raised.value.body["type"] == "authentication_error"  # type: ignore[index]


def test_the_rest_of_the_api_keeps_its_own_error_shape(live_server, live_token: str) -> None:  # type: ignore[no-untyped-def]
    answer = httpx.get(
        live_server.url + "/v2/datasets/nope", headers={"Authorization": f"Bearer {live_token}"}
    )
    assert answer.status_code == 404 and isinstance(answer.json()["error"], str)
