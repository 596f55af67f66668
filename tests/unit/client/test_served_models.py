"""tuneforge.rules.served_models: the serving key of a version served as a model never reads as a base
model's name, nor a base model's as a version's."""

from __future__ import annotations

import uuid

import pytest
from tuneforge.rules.served_models import version_model_key, version_uuid_of


def test_a_version_key_names_its_uuid_back() -> None:
    version = str(uuid.uuid4())
    assert version_uuid_of(version_model_key(version)) == version


@pytest.mark.parametrize(
    "key",
    ["tiny-random-llama", "HuggingFaceTB/SmolLM2-135M", "version:", "version:not-a-uuid", "version:acme/1"],
)
def test_base_model_names_and_malformed_keys_name_no_version(key: str) -> None:
    assert version_uuid_of(key) is None
