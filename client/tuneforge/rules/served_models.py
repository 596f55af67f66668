"""What a serving process serves as its model: a base model by name, or one adapter version merged into
(or, for whole-model versions, taking the place of) its base, keyed by the version's uuid.

The control plane names a version's serving process `version:<uuid>`: a uuid is unique across tenants
(two tenants' `repo/1` never share a process) and no base model name holds a ':' (Hugging Face ids do
not), so the key never collides with a base model's.
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


def version_model_key(version_uuid: str) -> str:
    """The serving key of a version served as a model of its own."""
    return f"{VERSION_MODEL_PREFIX}{version_uuid}"


def version_uuid_of(key: str) -> str | None:
    """The version uuid a serving key names, or None when it names a base model."""
    if not key.startswith(VERSION_MODEL_PREFIX):
        return None
    uuid = key[len(VERSION_MODEL_PREFIX) :]
    return uuid if _UUID.fullmatch(uuid) else None
