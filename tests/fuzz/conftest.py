"""The fuzz suite's fixtures: the tiny model and an adapter, and a serving backend for the proxy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzz_targets import TINY, ServingBackend, serving_adapter_root
from tests_support import TEST_SECRET_KEY


@pytest.fixture(scope="session")
def fuzz_model_dir(shared_model_cache: Path) -> Path:
    return shared_model_cache / TINY


@pytest.fixture(scope="session")
def fuzz_adapter_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return serving_adapter_root(tmp_path_factory.mktemp("fuzz-adapters"))


@pytest.fixture(scope="session")
def serving_backend(fuzz_model_dir: Path, fuzz_adapter_root: Path) -> Iterator[ServingBackend]:
    """What the control plane's serving routes forward to: a real engine over HTTP."""
    backend = ServingBackend(fuzz_model_dir, fuzz_adapter_root, TEST_SECRET_KEY)
    yield backend
    backend.close()
