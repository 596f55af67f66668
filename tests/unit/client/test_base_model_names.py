"""The base-model naming rules both planes share: built-ins, hub ids, catalogue names, imported names."""

from __future__ import annotations

from pathlib import Path

import pytest
from tuneforge.rules import base_models as rules


def test_a_catalogue_name_stands_for_its_hub_repo() -> None:
    name = rules.parse("llama-3-1-8b-instruct")
    assert (name.kind, name.repo_id, name.revision) == ("hub", "meta-llama/Llama-3.1-8B-Instruct", None)
    assert name.canonical == "meta-llama/Llama-3.1-8B-Instruct"
    assert name.pull_command == "tuneforge models pull meta-llama/Llama-3.1-8B-Instruct"


def test_a_hub_id_may_be_pinned_to_a_revision() -> None:
    name = rules.parse("Qwen/Qwen2.5-7B-Instruct@refs/pr/3")
    assert (name.kind, name.repo_id, name.revision) == ("hub", "Qwen/Qwen2.5-7B-Instruct", "refs/pr/3")
    # One key segment, reversible, distinct from the unpinned model's.
    assert name.store_prefix.count("/") == 2
    assert name.store_prefix != rules.parse("Qwen/Qwen2.5-7B-Instruct").store_prefix


def test_builtin_and_imported_names() -> None:
    assert rules.parse("smollm2-135m").kind == "builtin"
    assert rules.parse("our-llama.v2").kind == "imported"
    assert rules.parse("our-llama.v2").pull_command.startswith("tuneforge models import DIR --name")


@pytest.mark.parametrize(
    "bad", ["", "a/b/c", "../etc", "org/..", "Org Name/x", "/abs/path", "x" * 300, "UPPER"]
)
def test_names_no_rule_accepts_are_refused_with_what_is_accepted(bad: str) -> None:
    with pytest.raises(rules.BaseModelNameError, match="base model name"):
        rules.parse(bad)


def test_an_import_name_cannot_shadow_a_builtin_or_catalogue_name() -> None:
    for taken in ("smollm2-135m", "qwen2-5-7b-instruct"):
        with pytest.raises(rules.BaseModelNameError, match="choose another"):
            rules.check_import_name(taken)
    assert rules.check_import_name("team-model") == "team-model"


def test_hf_cache_snapshot_follows_refs_and_commits(tmp_path: Path) -> None:
    commit = "a" * 40
    repo = tmp_path / "models--some-org--some-model"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert rules.hf_cache_snapshot(tmp_path, "some-org/some-model", None) == repo / "snapshots" / commit
    assert rules.hf_cache_snapshot(tmp_path, "some-org/some-model", commit) == repo / "snapshots" / commit
    assert rules.hf_cache_snapshot(tmp_path, "some-org/some-model", "v2") is None
    assert rules.hf_cache_snapshot(tmp_path, "other/model", None) is None


def test_a_manifest_refuses_paths_outside_the_model_directory() -> None:
    good = {"path": "tokenizer.json", "sha256": "0" * 64, "size": 3}
    manifest = rules.ModelManifest(name="m", source="import", files=[good], config={"model_type": "llama"})
    assert (manifest.model_type, manifest.total_bytes) == ("llama", 3)
    for path in ("../x", "/etc/passwd", "a/../../b", "a\\b"):
        with pytest.raises(ValueError, match="relative path"):
            rules.StoredFile(path=path, sha256="0" * 64, size=1)


def test_a_catalogue_name_and_its_hub_id_are_aliases_of_one_model() -> None:
    names = rules.aliases("llama-3-1-8b-instruct")
    assert {"llama-3-1-8b-instruct", "meta-llama/Llama-3.1-8B-Instruct"} <= names
    assert rules.aliases("meta-llama/Llama-3.1-8B-Instruct") == names
    # A pinned revision is other weights; a directory is only itself.
    assert rules.aliases("meta-llama/Llama-3.1-8B-Instruct@abc") == {"meta-llama/Llama-3.1-8B-Instruct@abc"}
    assert rules.aliases("/models/llama") == {"/models/llama"}
    assert rules.aliases("tiny-random-llama") == {"tiny-random-llama"}
