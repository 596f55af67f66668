"""One tiny-random-llama build shared by the training tests (building it takes seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.training.base_models import resolve_base_model

TINY = "tiny-random-llama"


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("model-cache")
    resolve_base_model(TINY, cache)
    return cache
