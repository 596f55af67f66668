"""The model store on both stacks: an import's blobs, sha256s, manifest and row; refusals; removal; pull's
errors as huggingface_hub raises them.

Pull's success path is the import path (`store_directory`) with source=hub and the resolved commit:
what it downloads is never faked here, so it is covered by the import tests.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors
from tuneforge.rules.base_models import MANIFEST_NAME, ModelManifest, parse

from app.context import AppContext
from app.db import Deployment, StoredModel
from app.errors import ConflictError, InvalidInputError, NotFoundError, ServiceError
from app.services import auth, model_store
from app.services.model_store import HubUnreachableError

STACKS = ("embedded", "postgres_s3")


@pytest.fixture(params=STACKS)
def ctx(request: pytest.FixtureRequest, stack_settings_factory: Callable[..., Any]) -> Iterator[AppContext]:
    context = AppContext.from_settings(stack_settings_factory(request.param))
    yield context
    context.close()


def _name() -> str:
    return f"tiny-{secrets.token_hex(4)}"


def _import(ctx: AppContext, directory: Path, name: str, **options: Any) -> StoredModel:
    with ctx.sessions() as session:
        return model_store.import_directory(ctx.store, session, ctx.settings, directory, name, **options)


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_an_import_stores_every_file_with_its_sha256_then_the_manifest_and_the_row(
    ctx: AppContext, tiny_llama_dir: tuple[Path, int]
) -> None:
    directory, numel = tiny_llama_dir
    name = _name()
    row = _import(ctx, directory, name)

    prefix = parse(name).store_prefix
    manifest = ModelManifest.model_validate_json(ctx.store.read_bytes(prefix + MANIFEST_NAME))
    on_disk = {p.name: p.read_bytes() for p in directory.iterdir()}
    assert {f.path for f in manifest.files} == set(on_disk) >= {"model.safetensors", "tokenizer.json"}
    for stored in manifest.files:
        blob = ctx.store.read_bytes(f"{prefix}files/{stored.path}")
        assert blob == on_disk[stored.path]
        assert stored.sha256 == hashlib.sha256(blob).hexdigest() and stored.size == len(blob)
    assert manifest.config == json.loads(on_disk["config.json"])
    assert (manifest.name, manifest.source, manifest.repo_id, manifest.revision) == (
        name,
        "import",
        None,
        None,
    )

    assert (row.name, row.source, row.model_type) == (name, "import", "llama")
    assert row.parameter_count == numel and row.context_length == 512
    assert row.total_bytes == sum(len(b) for b in on_disk.values()) == manifest.total_bytes


def test_a_name_already_stored_is_a_conflict_unless_replaced(
    ctx: AppContext, tiny_llama_dir: tuple[Path, int], tiny_gpt2_dir: tuple[Path, int]
) -> None:
    name = _name()
    _import(ctx, tiny_llama_dir[0], name)
    with pytest.raises(ConflictError, match="--replace"):
        _import(ctx, tiny_gpt2_dir[0], name)
    row = _import(ctx, tiny_gpt2_dir[0], name, replace=True)
    assert (row.model_type, row.parameter_count, row.context_length) == ("gpt2", tiny_gpt2_dir[1], 128)
    manifest = ModelManifest.model_validate_json(
        ctx.store.read_bytes(parse(name).store_prefix + MANIFEST_NAME)
    )
    assert manifest.model_type == "gpt2"
    with ctx.sessions() as session:
        assert [r.name for r in model_store.list_models(session)].count(name) == 1


def test_a_directory_with_only_pickled_weights_is_refused_and_nothing_is_stored(
    ctx: AppContext, tiny_llama_dir: tuple[Path, int], tmp_path: Path
) -> None:
    directory = _copy(tiny_llama_dir[0], tmp_path / "pickled")
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    name = _name()
    with pytest.raises(
        InvalidInputError, match=r"pickle files only \(pytorch_model.bin\).*safe_serialization"
    ):
        _import(ctx, directory, name)
    assert ctx.store.list_keys(parse(name).store_prefix) == []


def test_a_config_that_needs_its_own_code_is_refused_unless_the_operator_trusts_it(
    stack_settings_factory: Callable[..., Any], tiny_llama_dir: tuple[Path, int], tmp_path: Path
) -> None:
    directory = _copy(tiny_llama_dir[0], tmp_path / "custom")
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (directory / "config.json").write_text(json.dumps(config))
    ctx = AppContext.from_settings(stack_settings_factory("embedded"))
    try:
        with pytest.raises(InvalidInputError, match=r"auto_map.*TUNEFORGE_TRUST_REMOTE_CODE_MODELS"):
            _import(ctx, directory, "custom-code")
    finally:
        ctx.close()
    trusting = AppContext.from_settings(
        stack_settings_factory("embedded", trust_remote_code_models=["custom-code"])
    )
    try:
        assert _import(trusting, directory, "custom-code").config["auto_map"] == config["auto_map"]
    finally:
        trusting.close()


@pytest.mark.parametrize(
    ("name", "fragment"),
    [("Has Spaces", "--name"), ("llama-3-1-8b", "catalogue name"), ("tiny-random-llama", "built-in")],
)
def test_an_import_name_the_rules_do_not_allow_is_refused_naming_the_option(
    ctx: AppContext, tiny_llama_dir: tuple[Path, int], name: str, fragment: str
) -> None:
    with pytest.raises(InvalidInputError, match=fragment):
        _import(ctx, tiny_llama_dir[0], name)


def test_remove_is_refused_while_a_deployment_names_the_model_then_deletes_blobs_and_row(
    ctx: AppContext, tiny_llama_dir: tuple[Path, int]
) -> None:
    name = _name()
    _import(ctx, tiny_llama_dir[0], name)
    with ctx.sessions() as session:
        user = auth.get_or_create_user(session, f"t-{secrets.token_hex(4)}", "alice")
        session.add(
            Deployment(tenant_id=user.tenant_id, name="d", base_model=name, config={"baseModel": name})
        )
        session.commit()
        with pytest.raises(ConflictError, match=r"deployment d.*--force"):
            model_store.remove(ctx.store, session, name)
        assert ctx.store.exists(parse(name).store_prefix + MANIFEST_NAME)
        model_store.remove(ctx.store, session, name, force=True)
        assert model_store.find(session, name) is None
        with pytest.raises(NotFoundError):
            model_store.remove(ctx.store, session, name)
    assert ctx.store.list_keys(parse(name).store_prefix) == []


# --- pull ------------------------------------------------------------------------------------------


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))


@pytest.mark.parametrize(
    ("raised", "status", "fragment"),
    [
        (hf_errors.GatedRepoError("gated", response=_response(403)), 403, model_store.TOKEN_FIX),
        (hf_errors.HfHubHTTPError("no", response=_response(401)), 403, "set HF_TOKEN"),
        (hf_errors.RepositoryNotFoundError("404", response=_response(401)), 404, "no such repository"),
        (hf_errors.RevisionNotFoundError("rev", response=_response(404)), 404, "no revision"),
        (hf_errors.LocalEntryNotFoundError("cannot find"), 503, model_store.HUB_UNREACHABLE),
        (httpx2.ConnectError("refused"), 503, "cannot reach the hub"),
        (hf_errors.HfHubHTTPError("boom", response=_response(500)), 502, "the hub answered 500"),
    ],
)  # fmt: skip
def test_pull_turns_huggingface_hub_errors_into_ones_an_operator_can_act_on(
    ctx: AppContext, monkeypatch: pytest.MonkeyPatch, raised: Exception, status: int, fragment: str
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def refuse(*args: Any, **kwargs: Any) -> str:
        raise raised

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with ctx.sessions() as session, pytest.raises(ServiceError) as caught:
        model_store.pull(ctx.store, session, ctx.settings, "acme/some-model@v1")
    assert caught.value.status_code == status and fragment in caught.value.message


def test_pull_in_offline_mode_says_where_to_pull_instead(
    ctx: AppContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with (
        ctx.sessions() as session,
        pytest.raises(HubUnreachableError, match=r"HF_HUB_OFFLINE.*models import"),
    ):
        model_store.pull(ctx.store, session, ctx.settings, "llama-3-1-8b-instruct")


def test_pull_without_a_reachable_hub_says_so(ctx: AppContext, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    with (
        ctx.sessions() as session,
        pytest.raises(HubUnreachableError, match=r"cannot reach the hub.*\(ConnectError\)"),
    ):
        model_store.pull(ctx.store, session, ctx.settings, "acme/some-model", endpoint=endpoint)


@pytest.mark.parametrize(
    ("name", "fragment"), [("tiny-random-llama", "built-in"), ("my-import", "not a hub repo")]
)
def test_pull_of_a_name_that_is_not_a_hub_repo_is_refused(ctx: AppContext, name: str, fragment: str) -> None:
    with ctx.sessions() as session, pytest.raises(InvalidInputError, match=fragment):
        model_store.pull(ctx.store, session, ctx.settings, name)
