"""One tiny-random-llama build and one set of adapters shared by the serving tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from serving_support import TINY, make_adapter_set

from worker.training.base_models import resolve_base_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resolve_base_model(TINY, tmp_path_factory.mktemp("serving-models"))


@pytest.fixture(scope="session")
def adapter_root(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`acme/1` … `acme/4`: LoRAs with different ranks and target modules, as `<root>/acme/<N>`."""
    root = tmp_path_factory.mktemp("adapters")
    make_adapter_set(tiny_model_dir, root)
    return root
