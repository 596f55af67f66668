"""One tiny-random-llama build shared by the training tests (building it takes seconds), and a small
LoRA version for the tests that continue from one."""

from __future__ import annotations

from pathlib import Path

import pytest
from training_support import make_config, number_rows

from worker.training.base_models import resolve_base_model
from worker.training.loop import train

TINY = "tiny-random-llama"


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("model-cache")
    resolve_base_model(TINY, cache)
    return cache


@pytest.fixture(scope="module")
def lora_dir(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step LoRA adapter directory (a parent for turbo runs)."""
    out = tmp_path_factory.mktemp("lora-parent")
    result = train(make_config(train_steps=2), number_rows(), output_dir=out, cache_dir=tiny_cache)
    assert result.adapter_dir is not None
    return result.adapter_dir
