"""What a serving process serves as its model, and with which engine: a base model by name, or one adapter
version merged into (or, for whole-model versions, taking the place of) its base, keyed by the version's
uuid; served by tuneforge's engine, or by vLLM when the key says `vllm:`.

The control plane names a version's serving process `version:<uuid>`: a uuid is unique across tenants
(two tenants' `repo/1` never share a process) and no base model name holds a ':' (Hugging Face ids do
not), so the key never collides with a base model's. A key served by vLLM carries the engine in front
(`vllm:smollm2-135m`, `vllm:version:<uuid>`); tuneforge's engine, the default, carries none, so every key
stored before there were two engines still means what it meant.
"""

from __future__ import annotations

import re

VERSION_MODEL_PREFIX = "version:"
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Adapter types whose artifact is a PEFT adapter merged into the base to serve or export it.
MERGEABLE_TYPES = ("lora", "dora", "turbo_lora")
# Adapter types whose artifact already is a whole model (config.json + safetensors + tokenizer).
WHOLE_MODEL_TYPES = ("full", "last_layer")
SERVABLE_AS_MODEL_TYPES = MERGEABLE_TYPES + WHOLE_MODEL_TYPES
# The serving engines a deployment may name (`config.engine`); the first is the default.
TUNEFORGE_ENGINE = "tuneforge"
VLLM_ENGINE = "vllm"
ENGINES = (TUNEFORGE_ENGINE, VLLM_ENGINE)
_VLLM_PREFIX = f"{VLLM_ENGINE}:"


def engine_key(model_key: str, engine: str) -> str:
    """The serving key of `model_key` (a base model or `version:<uuid>`) served by `engine`."""
    if engine not in ENGINES:
        raise ValueError(f"engine: one of {', '.join(ENGINES)} (got {engine!r})")
    return model_key if engine == TUNEFORGE_ENGINE else f"{_VLLM_PREFIX}{model_key}"


def engine_of(key: str) -> str:
    """The engine a serving key is served by."""
    return VLLM_ENGINE if key.startswith(_VLLM_PREFIX) else TUNEFORGE_ENGINE


def model_key_of(key: str) -> str:
    """The serving key without its engine: a base model's name, or `version:<uuid>`."""
    return key.removeprefix(_VLLM_PREFIX)


def version_model_key(version_uuid: str) -> str:
    """The serving key of a version served as a model of its own."""
    return f"{VERSION_MODEL_PREFIX}{version_uuid}"


def version_uuid_of(key: str) -> str | None:
    """The version uuid a serving key names (whichever engine serves it), or None for a base model."""
    key = model_key_of(key)
    if not key.startswith(VERSION_MODEL_PREFIX):
        return None
    uuid = key[len(VERSION_MODEL_PREFIX) :]
    return uuid if _UUID.fullmatch(uuid) else None
