"""Adapter files built byte by byte for the upload validator tests: valid PEFT LoRAs and hostile ones."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

# tiny-random-llama's shape (hidden 64, 4 heads of 16, 2 KV heads, MLP 128, 2 layers).
TINY_CONFIG = {
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
}
TINY_SHAPES = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
               "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}  # fmt: skip
PARENT = {"gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def lora_config(
    rank: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj"), **extra: Any
) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny-random-llama",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": list(targets),
    } | extra


def weight_name(layer: int, module: str, which: str) -> str:
    parent = PARENT.get(module, "self_attn")
    return f"base_model.model.model.layers.{layer}.{parent}.{module}.lora_{which}.weight"


def as_dtype(values: np.ndarray, dtype: str) -> bytes:
    """float32 values in a safetensors dtype's little-endian bytes (BF16: the top half of each F32)."""
    if dtype == "BF16":
        return (values.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    return values.astype({"F16": "<f2", "F32": "<f4", "F64": "<f8"}[dtype]).tobytes()


def lora_tensors(
    rank: int = 4,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    layers: tuple[int, ...] = (0, 1),
    dtype: str = "F32",
    seed: int = 0,
) -> dict[str, tuple[str, list[int], bytes]]:
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in layers:
        for module in targets:
            features_in, features_out = TINY_SHAPES[module]
            for which, shape in (("A", [rank, features_in]), ("B", [features_out, rank])):
                values = rng.standard_normal(shape).astype("float32")
                tensors[weight_name(layer, module, which)] = (dtype, shape, as_dtype(values, dtype))
    return tensors


def safetensors_bytes(
    tensors: dict[str, tuple[str, list[int], bytes]], *, metadata: dict[str, str] | None = None
) -> bytes:
    """The safetensors layout: u64 header length, JSON header (offsets in order), then the data."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    data, offset = bytearray(), 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    return framed(json.dumps(header).encode(), bytes(data))


def framed(header: bytes, data: bytes = b"") -> bytes:
    padded = header + b" " * (-len(header) % 8)
    return struct.pack("<Q", len(padded)) + padded + data


def chunked(raw: bytes, size: int) -> list[bytes]:
    return [raw[i : i + size] for i in range(0, len(raw), size)] or [b""]
