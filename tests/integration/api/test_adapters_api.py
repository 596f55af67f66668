"""Adapter versions: upload an existing PEFT adapter, get, archive, download, delete — and bad uploads."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from tests_support import assert_error, write_peft_adapter

from app.db.session import transaction
from app.main import create_app
from app.services import auth


def _upload(tenant, repo: str, files: dict[str, bytes]):  # type: ignore[no-untyped-def]
    begun = tenant.client.post("/v2/adapters/upload", json={"repo": repo})
    assert begun.status_code == 200, begun.text
    urls = begun.json()["presignedUrls"]
    assert set(urls) == {
        "adapter_config.json",
        "adapter_model.bin",
        "adapter_model.safetensors",
        "classifier_labels.json",
    }
    for name, data in files.items():
        tenant.put_presigned(urls[name], data).raise_for_status()
    return tenant.client.put("/v2/adapters/upload/", json={"uploadToken": begun.json()["uploadToken"]})


def _adapter_files(tmp_path: Path) -> dict[str, bytes]:
    directory = write_peft_adapter(tmp_path / "adapter")
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_upload_get_archive_download_delete(tenant, tmp_path: Path) -> None:
    files = _adapter_files(tmp_path)
    response = _upload(tenant, "uploaded", files)
    assert response.status_code == 200, response.text
    version = response.json()
    assert (version["repo"], version["tag"], version["status"]) == ("uploaded", 1, "completed")
    assert version["baseModel"] == "tiny-random-llama" and version["adapterPath"] == "uploaded/1"
    assert version["finetuningJob"] == {"uuid": None, "error": None}
    for name, data in files.items():
        assert version["artifactFiles"][name]["sha256"] == hashlib.sha256(data).hexdigest()

    assert tenant.client.get("/v2/repos/uploaded").json()["versions"][0]["tag"] == 1
    archived = tenant.client.put("/v2/repos/uploaded/version/1", json={"archived": True}).json()
    assert archived["archived"] is True
    assert (
        tenant.client.put("/v2/repos/uploaded/version/1", json={"archived": False}).json()["archived"]
        is False
    )

    download = tenant.client.get("/v2/repos/uploaded/version/1/download")
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(download.content)) as archive:
        assert {n: archive.read(n) for n in archive.namelist()} == files

    assert tenant.client.delete("/v2/repos/uploaded/version/1").status_code == 200
    assert_error(tenant.client.get("/v2/repos/uploaded/version/1"), 404, "not found")


def test_tags_increase_and_are_never_reused(tenant, tmp_path: Path) -> None:
    files = _adapter_files(tmp_path)
    assert [_upload(tenant, "r", files).json()["tag"] for _ in range(2)] == [1, 2]
    tenant.client.delete("/v2/repos/r/version/2")
    assert _upload(tenant, "r", files).json()["tag"] == 3


def test_pickle_only_upload_is_refused_without_unpickling(tenant, tmp_path: Path) -> None:
    files = _adapter_files(tmp_path)
    # A pickle that would run code if anything unpickled it.
    evil = b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode() + b"'\ntR."
    response = _upload(
        tenant, "pickled", {"adapter_config.json": files["adapter_config.json"], "adapter_model.bin": evil}
    )
    assert_error(response, 422, "pickle")
    assert not (tmp_path / "pwned").exists()
    assert tenant.client.get("/v2/repos/pickled").json()["versions"] == []


def test_missing_config_is_422(tenant, tmp_path: Path) -> None:
    files = _adapter_files(tmp_path)
    del files["adapter_config.json"]
    assert_error(_upload(tenant, "noconfig", files), 422, "adapter_config.json")


def test_config_without_base_model_is_422(tenant, tmp_path: Path) -> None:
    files = _adapter_files(tmp_path)
    config = json.loads(files["adapter_config.json"])
    del config["base_model_name_or_path"]
    files["adapter_config.json"] = json.dumps(config).encode()
    assert_error(_upload(tenant, "nobase", files), 422, "base_model_name_or_path")


def test_corrupt_safetensors_is_422(tenant, tmp_path: Path) -> None:
    files = _adapter_files(tmp_path)
    files["adapter_model.safetensors"] = files["adapter_model.safetensors"][:-10]
    assert_error(_upload(tenant, "corrupt", files), 422, "safetensors")
    files["adapter_model.safetensors"] = b"\x00" * 64
    assert_error(_upload(tenant, "corrupt", files), 422, "safetensors")


def test_version_tag_must_be_a_number(tenant) -> None:
    tenant.client.post("/v2/repos", json={"name": "r"})
    assert_error(tenant.client.get("/v2/repos/r/version/latest"), 422, "tag")


def test_another_tenants_version_is_404_and_untouched(tenant, other_tenant, tmp_path: Path) -> None:
    _upload(tenant, "mine", _adapter_files(tmp_path))
    for method in ("get", "delete"):
        assert_error(getattr(other_tenant.client, method)("/v2/repos/mine/version/1"), 404, "not found")
    assert_error(
        other_tenant.client.put("/v2/repos/mine/version/1", json={"archived": True}), 404, "not found"
    )
    assert_error(other_tenant.client.get("/v2/repos/mine/version/1/download"), 404, "not found")
    version = tenant.client.get("/v2/repos/mine/version/1").json()
    assert version["archived"] is False and version["status"] == "completed"


def test_repeating_the_finish_step_returns_the_same_version(tenant, tmp_path: Path) -> None:
    begun = tenant.client.post("/v2/adapters/upload", json={"repo": "retry"}).json()
    for name, data in _adapter_files(tmp_path).items():
        tenant.put_presigned(begun["presignedUrls"][name], data).raise_for_status()
    body = {"uploadToken": begun["uploadToken"]}
    first, second = (tenant.client.put("/v2/adapters/upload/", json=body) for _ in range(2))
    assert first.status_code == second.status_code == 200, second.text
    assert first.json()["uuid"] == second.json()["uuid"] and first.json()["tag"] == 1
    assert len(tenant.client.get("/v2/repos/retry").json()["versions"]) == 1


def _with_tensor(files: dict[str, bytes], name: str, values: Any) -> dict[str, bytes]:
    """The adapter's files with one tensor replaced (safetensors rewritten as save_pretrained would)."""
    from safetensors.numpy import load, save

    tensors = load(files["adapter_model.safetensors"])
    tensors[name] = values
    return files | {"adapter_model.safetensors": save(tensors)}


class _Uploader:
    """What `_upload` needs of a tenant, on an app of the test's own (local blob store: URLs on the app)."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    def put_presigned(self, url: str, data: bytes) -> Any:
        return self.client.put(url, content=data, headers={"Content-Type": "application/octet-stream"})


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def test_an_adapter_with_one_nan_is_422_naming_the_tensor(tenant, tmp_path: Path) -> None:
    files = _adapter_files(tmp_path)
    values = np.ones((4, 64), dtype="float32")
    values[3, 63] = np.nan
    response = _upload(tenant, "nan", _with_tensor(files, Q_A, values))
    assert_error(response, 422, f"{Q_A!r} holds NaN or infinite values")
    assert_error(tenant.client.get("/v2/repos/nan/version/1"), 404, "not found")


def test_a_wrong_shape_is_422_where_the_control_plane_knows_the_base_model(
    stack_settings_factory, shared_model_cache: Path, tmp_path: Path
) -> None:
    settings = stack_settings_factory("embedded", model_cache_dir=shared_model_cache)
    with TestClient(create_app(settings)) as api:
        with transaction(api.app.state.ctx.sessions) as session:
            token = auth.create_token(session, auth.get_or_create_user(session, "shapes", "alice"))
        tenant = _Uploader(TestClient(api.app, headers={"Authorization": f"Bearer {token}"}))
        files = _with_tensor(_adapter_files(tmp_path), Q_A, np.ones((4, 48), dtype="float32"))
        assert_error(_upload(tenant, "shapes", files), 422, "its input has 64 features, not 48")
        assert _upload(tenant, "shapes", _adapter_files(tmp_path / "fits")).status_code == 200


def _classifier_files(tmp_path: Path, labels: bytes | None) -> dict[str, bytes]:
    """A classification adapter as the trainer writes it: a SEQ_CLS LoRA, its score head and label file."""
    from safetensors.numpy import load_file, save_file

    directory = write_peft_adapter(tmp_path / "classifier")
    config = json.loads((directory / "adapter_config.json").read_text())
    config |= {"task_type": "SEQ_CLS", "modules_to_save": ["score"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    weights = directory / "adapter_model.safetensors"
    tensors = load_file(str(weights)) | {"base_model.model.score.weight": np.zeros((2, 64), "float32")}
    save_file(tensors, str(weights))
    files = {p.name: p.read_bytes() for p in directory.iterdir()}
    if labels is not None:
        files["classifier_labels.json"] = labels
    return files


def test_a_classifier_uploads_with_its_label_file_and_not_without(tenant, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tuneforge.rules.classifier import encode_labels

    refused = _upload(tenant, "classifier", _classifier_files(tmp_path / "a", None))
    assert_error(refused, 422, "classifier_labels.json: missing")
    broken = _upload(
        tenant, "classifier", _classifier_files(tmp_path / "b", b'{"format": 1, "labels": ["x"]}')
    )
    assert_error(broken, 422, "labels")
    labels = encode_labels(["negative", "positive"]).encode()
    accepted = _upload(tenant, "classifier", _classifier_files(tmp_path / "c", labels))
    assert accepted.status_code == 200, accepted.text
