"""Owns the tokenised-dataset cache: one tokenisation per (dataset, tokenizer, data settings).

Tokenising with a chat template is slow in Python (each chat is rendered once per assistant
turn to find its spans), and every retry, resume and re-run of a job on the same dataset would
repeat it. The result is cached as a small safetensors file of int32 arrays; where it is kept is
the caller's business (the worker keeps it in the blob store beside the tenant's datasets).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load, save

from worker.training.config import TrainingConfig
from worker.training.data import DataStats, Example, PreparedData

# Bump when tokenisation or this file's layout changes, so old entries are never read.
CACHE_FORMAT = 1
# Config fields the examples depend on; nothing else may invalidate (or fail to invalidate) an entry.
DATA_FIELDS = ("task", "apply_chat_template", "max_seq_length", "eval_fraction", "max_eval_samples", "seed")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


class DataCache(Protocol):
    """Somewhere to keep cache entries by key; a missing entry is None."""

    def get(self, key: str) -> bytes | None: ...
    def put(self, key: str, data: bytes) -> None: ...


def cache_key(dataset_fingerprint: str, tokenizer_dir: Path, config: TrainingConfig) -> str:
    """sha256 over the dataset's bytes hash, the tokenizer's files and the data settings."""
    digest = hashlib.sha256()
    fields = {name: getattr(config, name) for name in DATA_FIELDS}
    digest.update(json.dumps([CACHE_FORMAT, dataset_fingerprint, fields], sort_keys=True).encode())
    for name in _TOKENIZER_FILES:
        path = tokenizer_dir / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def encode(data: PreparedData) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    for part, examples in (("train", data.train), ("eval", data.eval)):
        lengths = [len(e.input_ids) for e in examples]
        tensors[f"{part}.lengths"] = torch.tensor(lengths, dtype=torch.int32)
        tensors[f"{part}.input_ids"] = torch.tensor(
            [t for e in examples for t in e.input_ids], dtype=torch.int32
        )
        tensors[f"{part}.labels"] = torch.tensor([t for e in examples for t in e.labels], dtype=torch.int32)
    stats = asdict(data.stats)
    return save(tensors, metadata={"format": str(CACHE_FORMAT), "stats": json.dumps(stats)})


def decode(blob: bytes) -> PreparedData:
    tensors = load(blob)
    metadata = _metadata(blob)
    if metadata.get("format") != str(CACHE_FORMAT):
        raise ValueError("tokenised-data cache entry has another format")
    stats = json.loads(metadata["stats"])
    stats["truncated_row_numbers"] = tuple(stats["truncated_row_numbers"])
    parts = {}
    for part in ("train", "eval"):
        lengths = tensors[f"{part}.lengths"].tolist()
        ids = tensors[f"{part}.input_ids"].split(lengths)
        labels = tensors[f"{part}.labels"].split(lengths)
        parts[part] = [Example(i.tolist(), lab.tolist()) for i, lab in zip(ids, labels, strict=True)]
    return PreparedData(parts["train"], parts["eval"], DataStats(**stats))


def _metadata(blob: bytes) -> dict[str, str]:
    # safetensors' header: 8-byte little-endian length, then JSON with "__metadata__".
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    return dict(header.get("__metadata__", {}))
