"""The control plane's copy of the built-in catalogue equals the worker's and the shared rules' (the
control plane cannot import the worker, so this test is what keeps the copies together)."""

from __future__ import annotations

from tuneforge.rules import base_models as rules

from app.services import base_models
from worker.training.base_models import list_builtin_models


def test_the_control_planes_builtin_catalogue_is_the_workers() -> None:
    assert list(base_models.BUILTIN_MODELS) == list_builtin_models()
    assert tuple(model["name"] for model in base_models.BUILTIN_MODELS) == rules.BUILTIN_MODELS


def test_builtins_are_llama_models_the_engine_serves() -> None:
    assert base_models.BUILTIN_MODEL_TYPE in rules.SERVED_MODEL_TYPES
