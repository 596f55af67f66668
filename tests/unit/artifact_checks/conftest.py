"""One tiny-random-llama build shared by the artifact-check tests (building it takes seconds)."""

from __future__ import annotations

import os

# Before transformers is imported: nothing in these tests may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path

import pytest
from artifact_checks_support import TINY

from worker.training.base_models import resolve_base_model


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("model-cache")
    resolve_base_model(TINY, cache)
    return cache
