"""tuneforge.rules.served_models: the serving key of a version served as a model never reads as a base
model's name, nor a base model's as a version's."""

from __future__ import annotations

import uuid

import pytest
from tuneforge.rules.served_models import (
    engine_key,
    engine_of,
    model_key_of,
    version_model_key,
    version_uuid_of,
)


def test_a_version_key_names_its_uuid_back() -> None:
    version = str(uuid.uuid4())
    assert version_uuid_of(version_model_key(version)) == version


@pytest.mark.parametrize(
    "key",
    ["tiny-random-llama", "HuggingFaceTB/SmolLM2-135M", "version:", "version:not-a-uuid", "version:acme/1"],
)
def test_base_model_names_and_malformed_keys_name_no_version(key: str) -> None:
    assert version_uuid_of(key) is None


@pytest.mark.parametrize(
    "model_key", ["smollm2-135m", "meta-llama/Llama-3.1-8B-Instruct", f"version:{uuid.uuid4()}"]
)
def test_the_engine_travels_in_the_key_and_tuneforges_keys_are_unchanged(model_key: str) -> None:
    assert engine_key(model_key, "tuneforge") == model_key, "keys stored before engines keep their meaning"
    on_vllm = engine_key(model_key, "vllm")
    assert (engine_of(on_vllm), model_key_of(on_vllm)) == ("vllm", model_key)
    assert (engine_of(model_key), model_key_of(model_key)) == ("tuneforge", model_key)
    assert version_uuid_of(on_vllm) == version_uuid_of(model_key)


def test_an_unknown_engine_names_the_engines() -> None:
    with pytest.raises(ValueError, match="engine: one of tuneforge, vllm"):
        engine_key("smollm2-135m", "tgi")
