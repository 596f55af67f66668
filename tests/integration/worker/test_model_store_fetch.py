"""worker.model_store: a base model found by name in an HF cache, fetched (checked) from the model store
in a local directory or S3, or listed by the operator; a model's own code refused unless allowed."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from model_dirs import lay_out_hf_cache
from model_store_support import COMMIT, HUB_ID, build_tiny_llama, put_in_store
from transformers import AutoModelForCausalLM
from tuneforge.rules.base_models import parse

from app.settings import Settings
from app.storage import S3BlobStore, open_blob_store
from app.storage.base import BlobStore
from worker.model_store import (
    FETCHED_RECORD,
    BaseModelUnavailableError,
    RemoteCodeRefusedError,
    StoredModelError,
    resolve_model_dir,
    trusts_remote_code,
)

pytestmark = pytest.mark.integration

PROMPT = [[1, 17, 42, 99, 7]]


@pytest.fixture(scope="module")
def source_model(shared_model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tokenizer_dir = shared_model_cache / "tiny-random-llama"
    return build_tiny_llama(tmp_path_factory.mktemp("source") / "model", tokenizer_dir)


@pytest.fixture(scope="module")
def hub_cache(source_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    hub = tmp_path_factory.mktemp("hf-home") / "hub"
    lay_out_hf_cache(hub, HUB_ID, source_model, COMMIT)
    return hub


@pytest.fixture
def make_settings(tmp_path: Path, hub_cache: Path) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        fields: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "model_cache_dir": tmp_path / "models",
            "hf_hub_cache": hub_cache,
        }
        return Settings(**(fields | overrides))

    return build


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, make_settings: Callable[..., Settings]) -> BlobStore:
    if request.param == "local":
        return open_blob_store(make_settings())
    s3 = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return S3BlobStore(bucket, "tuneforge/", endpoint_url=s3.endpoint_url, region=s3.region)


def _logits(model_dir: Path) -> torch.Tensor:
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(PROMPT)).logits


# --- the HF cache, read in place ---------------------------------------------------------------------


def test_a_hub_id_resolves_to_its_snapshot_by_branch_and_by_commit(
    make_settings: Callable[..., Settings], hub_cache: Path, source_model: Path, tmp_path: Path
) -> None:
    settings = make_settings()
    store = open_blob_store(settings)
    snapshot = hub_cache / "models--some-org--some-model" / "snapshots" / COMMIT

    for name in (HUB_ID, f"{HUB_ID}@{COMMIT}", f"{HUB_ID}@main"):
        assert resolve_model_dir(settings, store, name) == snapshot

    assert torch.equal(_logits(snapshot), _logits(source_model))
    assert not (tmp_path / "models").exists()  # read in place: nothing copied


def test_a_catalogue_name_resolves_through_its_hub_id(
    make_settings: Callable[..., Settings], source_model: Path, tmp_path: Path
) -> None:
    snapshot = lay_out_hf_cache(tmp_path / "hub", "meta-llama/Llama-3.2-1B", source_model, COMMIT)
    settings = make_settings(hf_hub_cache=tmp_path / "hub")

    assert resolve_model_dir(settings, open_blob_store(settings), "llama-3-2-1b") == snapshot


def test_a_model_found_nowhere_names_the_command_that_makes_it_available(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings()
    store = open_blob_store(settings)

    with pytest.raises(BaseModelUnavailableError, match="tuneforge models pull some-org/some-model@v2"):
        resolve_model_dir(settings, store, f"{HUB_ID}@v2")  # no such ref in the cache
    with pytest.raises(BaseModelUnavailableError, match="tuneforge models import DIR --name my-model"):
        resolve_model_dir(settings, store, "my-model")
    with pytest.raises(BaseModelUnavailableError, match="not a base model name"):
        resolve_model_dir(settings, store, "/not/listed")


# --- the model store, fetched ------------------------------------------------------------------------


def test_a_stored_model_is_fetched_checked_and_loads_and_a_second_resolve_reuses_it(
    make_settings: Callable[..., Settings], store: BlobStore, source_model: Path, tmp_path: Path
) -> None:
    settings = make_settings()
    manifest = put_in_store(store, "my-model", source_model)

    fetched = resolve_model_dir(settings, store, "my-model")

    assert fetched == tmp_path / "models" / "store" / "my-model"
    for stored in manifest.files:
        data = (fetched / stored.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == stored.sha256 and len(data) == stored.size
    assert torch.equal(_logits(fetched), _logits(source_model))
    # Reused as it is: with the files gone from the store, a second resolve still finds the model.
    store.delete_prefix(parse("my-model").store_prefix + "files/")
    assert resolve_model_dir(settings, store, "my-model") == fetched
    assert torch.equal(_logits(fetched), _logits(source_model))


def test_a_hub_model_in_the_store_but_not_the_hf_cache_is_fetched(
    make_settings: Callable[..., Settings], source_model: Path, tmp_path: Path
) -> None:
    settings = make_settings()
    store = open_blob_store(settings)
    put_in_store(store, "some-org/other-model@v1", source_model)

    fetched = resolve_model_dir(settings, store, "some-org/other-model@v1")

    assert fetched == tmp_path / "models" / "store" / "some-org%2Fother-model%40v1"
    assert (fetched / "model.safetensors").is_file()


def test_a_reimported_model_is_fetched_again(
    make_settings: Callable[..., Settings], source_model: Path, shared_model_cache: Path, tmp_path: Path
) -> None:
    settings = make_settings()
    store = open_blob_store(settings)
    put_in_store(store, "my-model", source_model)
    first = _logits(resolve_model_dir(settings, store, "my-model"))
    other = build_tiny_llama(tmp_path / "other", shared_model_cache / "tiny-random-llama", seed=2)
    put_in_store(store, "my-model", other)

    fetched = resolve_model_dir(settings, store, "my-model")

    assert torch.equal(_logits(fetched), _logits(other)) and not torch.equal(first, _logits(other))
    assert sorted(p.name for p in fetched.parent.iterdir()) == ["my-model", "my-model.lock"]


def test_a_corrupt_blob_fails_clearly_and_leaves_no_directory(
    make_settings: Callable[..., Settings], store: BlobStore, source_model: Path, tmp_path: Path
) -> None:
    settings = make_settings()
    put_in_store(store, "my-model", source_model)
    key = parse("my-model").store_prefix + "files/model.safetensors"
    data = bytearray(store.read_bytes(key))
    data[len(data) // 2] ^= 0xFF
    store.put_stream(key, [bytes(data)])

    with pytest.raises(StoredModelError, match=r"model.safetensors in the model store is corrupt.*re-run"):
        resolve_model_dir(settings, store, "my-model")

    assert [p.name for p in (tmp_path / "models" / "store").iterdir()] == ["my-model.lock"]


def test_a_missing_blob_fails_clearly_and_leaves_no_directory(
    make_settings: Callable[..., Settings], source_model: Path, tmp_path: Path
) -> None:
    settings = make_settings()
    store = open_blob_store(settings)
    put_in_store(store, "my-model", source_model)
    store.delete(parse("my-model").store_prefix + "files/tokenizer.json")

    with pytest.raises(StoredModelError, match=r"tokenizer\.json, listed in its manifest, is missing"):
        resolve_model_dir(settings, store, "my-model")

    assert [p.name for p in (tmp_path / "models" / "store").iterdir()] == ["my-model.lock"]
    assert FETCHED_RECORD not in {p.name for p in tmp_path.rglob("*")}


# --- models' own code, operators' directories, built-ins -------------------------------------------


def _with_auto_map(source_model: Path, out: Path) -> Path:
    shutil.copytree(source_model, out)
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_odd.OddForCausalLM"}
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_a_model_with_its_own_code_is_refused_unless_the_operator_allows_it(
    make_settings: Callable[..., Settings], source_model: Path, tmp_path: Path
) -> None:
    odd = _with_auto_map(source_model, tmp_path / "odd")
    snapshot = lay_out_hf_cache(tmp_path / "hub", "odd-org/odd-model", odd, COMMIT)
    refusing = make_settings(hf_hub_cache=tmp_path / "hub")
    allowing = make_settings(hf_hub_cache=tmp_path / "hub", trust_remote_code_models=["odd-org/odd-model"])
    store = open_blob_store(refusing)

    with pytest.raises(RemoteCodeRefusedError, match="TUNEFORGE_TRUST_REMOTE_CODE_MODELS"):
        resolve_model_dir(refusing, store, "odd-org/odd-model")
    assert not trusts_remote_code(refusing, "odd-org/odd-model")

    assert resolve_model_dir(allowing, store, "odd-org/odd-model@main") == snapshot
    assert trusts_remote_code(allowing, "odd-org/odd-model@main")
    assert not trusts_remote_code(allowing, HUB_ID)


def test_a_directory_the_operator_listed_resolves_as_it_is(
    make_settings: Callable[..., Settings], source_model: Path, tmp_path: Path
) -> None:
    settings = make_settings(extra_base_models=[str(source_model)])
    store = open_blob_store(settings)

    assert resolve_model_dir(settings, store, str(source_model)) == source_model
    odd = _with_auto_map(source_model, tmp_path / "odd")
    listed = make_settings(extra_base_models=[str(odd)])
    with pytest.raises(RemoteCodeRefusedError):
        resolve_model_dir(listed, store, str(odd))
    with pytest.raises(BaseModelUnavailableError):
        resolve_model_dir(make_settings(), store, str(source_model))


def test_a_builtin_model_is_built_in_the_model_cache(
    make_settings: Callable[..., Settings], shared_model_cache: Path
) -> None:
    settings = make_settings(model_cache_dir=shared_model_cache)

    resolved = resolve_model_dir(settings, open_blob_store(settings), "tiny-random-llama")

    assert resolved == shared_model_cache / "tiny-random-llama"
