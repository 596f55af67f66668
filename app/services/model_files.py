"""What a model directory holds, read without torch: the files the store keeps, config.json, tensor sizes.

The model store copies a Hugging Face-format directory (what `save_pretrained` writes, what a hub
snapshot holds): its config, generation config and tokenizer files, and its safetensors weights.
Pickled weights (`*.bin`, `*.pt`) are never copied: loading them can run arbitrary code.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import InvalidInputError

CONFIG_NAME = "config.json"
WEIGHTS_INDEX = "model.safetensors.index.json"
# Files of a model directory the store keeps besides the weights.
KEPT_NAMES = frozenset(
    {
        CONFIG_NAME,
        "generation_config.json",
        WEIGHTS_INDEX,
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "tokenizer.model",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
    }
)
WEIGHTS_SUFFIX = ".safetensors"
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What `models pull` downloads: the kept files; never pickles, nor the duplicate "original" weights
# some repos carry beside the transformers ones (Llama's `original/`, Mistral's `consolidated.*`).
PULL_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.txt", "*.jinja"]
PULL_IGNORED = ["*/*", "consolidated*"]

# An HF config.json is a few KB; a safetensors header lists each tensor's name, dtype, shape, offsets.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Where configs keep the longest sequence the model was trained for (GPT-2 style, T5 style, ...).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
MAX_CONTEXT_LENGTH = 2**31 - 1


@dataclass(frozen=True)
class ModelFiles:
    """The files of a model directory the store keeps, as paths relative to it."""

    weights: tuple[str, ...]  # the safetensors files the model loads from
    others: tuple[str, ...]  # config, tokenizer, the weights' index

    @property
    def all(self) -> tuple[str, ...]:
        return self.others + self.weights


def read_config(directory: Path) -> dict[str, Any]:
    """The directory's config.json as a dict; a missing or unreadable one is refused, naming the file."""
    path = directory / CONFIG_NAME
    config = read_json(path, MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise InvalidInputError(f"{path}: must hold a JSON object (a Hugging Face model config)")
    return config


def read_json(path: Path, max_bytes: int) -> Any:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InvalidInputError(f"{path}: {size} bytes exceeds the limit of {max_bytes} for this file")
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise InvalidInputError(f"{path}: missing; a model directory needs it") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise InvalidInputError(f"{path}: not readable JSON ({exc})") from None


def select_files(directory: Path) -> ModelFiles:
    """The kept files at the top of `directory`; refuses one whose weights are only pickled, or missing."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    others = tuple(n for n in names if n in KEPT_NAMES)
    if WEIGHTS_INDEX in names:
        weights = _indexed_weights(directory, set(names))
    else:
        weights = tuple(n for n in names if n.endswith(WEIGHTS_SUFFIX))
    if weights:
        return ModelFiles(weights=weights, others=others)
    pickled = [n for n in names if n.endswith(PICKLED_SUFFIXES)]
    if pickled:
        raise InvalidInputError(
            f"{directory}: the weights are pickle files only ({', '.join(pickled[:3])}), which tuneforge "
            "never loads (unpickling can run arbitrary code). Convert them first: load the model with "
            "transformers and `save_pretrained(dir, safe_serialization=True)`, then import that directory"
        )
    raise InvalidInputError(f"{directory}: no *.safetensors weights; a model directory needs them")


def _indexed_weights(directory: Path, present: set[str]) -> tuple[str, ...]:
    """The shards a sharded checkpoint's index names (not every *.safetensors beside it)."""
    index = read_json(directory / WEIGHTS_INDEX, MAX_CONFIG_BYTES * 64)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InvalidInputError(f"{directory / WEIGHTS_INDEX}: needs a non-empty weight_map")
    shards = sorted({str(shard) for shard in weight_map.values()})
    missing = [s for s in shards if s not in present or not s.endswith(WEIGHTS_SUFFIX)]
    if missing:
        raise InvalidInputError(f"{directory / WEIGHTS_INDEX}: names shards that are not here: {missing[:3]}")
    return tuple(shards)


def tensor_elements(path: Path) -> int:
    """How many parameters a safetensors file holds: its JSON header's shapes, no tensor read."""
    try:
        with path.open("rb") as handle:
            prefix = handle.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 2 <= length <= MAX_HEADER_BYTES:
                raise InvalidInputError(f"{path}: not a safetensors file (header length {length})")
            header = json.loads(handle.read(length))
        data_bytes = path.stat().st_size - 8 - length
    except (OSError, ValueError, RecursionError) as exc:
        if isinstance(exc, InvalidInputError):
            raise
        raise InvalidInputError(f"{path}: not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise InvalidInputError(f"{path}: a safetensors header is a JSON object")
    return sum(
        _elements(path, name, entry, data_bytes) for name, entry in header.items() if name != "__metadata__"
    )


def _elements(path: Path, name: str, entry: Any, data_bytes: int) -> int:
    shape = entry.get("shape") if isinstance(entry, dict) else None
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InvalidInputError(f"{path}: tensor {name!r} has no valid shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise InvalidInputError(f"{path}: tensor {name!r} lies outside the file (truncated?)")
    return math.prod(shape)


def context_length(config: dict[str, Any]) -> int | None:
    """The longest sequence the config declares (a multimodal model's text config counts too)."""
    for scope in (config, config.get("text_config")):
        if not isinstance(scope, dict):
            continue
        for key in CONTEXT_KEYS:
            value = scope.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_CONTEXT_LENGTH:
                return value
    return None


def model_type(config: dict[str, Any]) -> str | None:
    value = config.get("model_type")
    return value if isinstance(value, str) and 0 < len(value) <= 64 else None
