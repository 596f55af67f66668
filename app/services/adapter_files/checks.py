"""The adapter upload validator: an uploaded adapter_config.json and adapter_model.safetensors, checked
before any version points at them.

An uploaded adapter is hostile until checked: it will be loaded by a serving process every tenant of
its base model shares. The config must follow `tuneforge.lora_rules` (a LoRA, ranks within the
configured maximum, literal pattern keys, projection target modules); the weights file must be a
well-formed safetensors file (bounded header, tensors that exactly tile the data) whose every tensor
is one half of a LoRA pair of the configured rank, floating point, and finite. The data section is
streamed and scanned in place: a non-finite float has all exponent bits set, whatever its width, so
bf16 (which numpy lacks) is checked as 16-bit integers like every other float.

Shapes are checked against the base model's modules where this control plane can read its
config.json (`base_models.model_config`); where it cannot (an API pod without the model cache), the
serving process checks them when it loads the adapter, and this validator says so in its log.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from tuneforge import lora_rules
from tuneforge.rules.artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS

from app.errors import InvalidInputError

# A LoRA of an 80-layer model has ~1,100 tensors and a header of ~200 KB; far more is not a LoRA.
MAX_HEADER_BYTES = 8 * 1024 * 1024
MAX_TENSORS = 16_384
MAX_DIMENSION = 1 << 24
# PEFT configs nest two or three levels (loftq_config, layer_replication); deeper is not one.
MAX_CONFIG_DEPTH = 16
MAX_BASE_MODEL_NAME = 255  # the column's width
# Bytes per element and the exponent bits that, all set, make a float NaN or infinite.
_FLOATS: dict[str, tuple[str, int]] = {
    "F16": ("<u2", 0x7C00),
    "BF16": ("<u2", 0x7F80),
    "F32": ("<u4", 0x7F800000),
    "F64": ("<u8", 0x7FF0000000000000),
}


def _refuse(file: str, message: str) -> InvalidInputError:
    return InvalidInputError(f"{file}: {message}")


# --- adapter_config.json ------------------------------------------------------------------------


def parse_config(raw: bytes, *, max_rank: int) -> dict[str, Any]:
    """The config as a dict that follows the LoRA rules; 422 naming the field otherwise."""
    try:
        config = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise _refuse(
            ADAPTER_CONFIG, "not valid JSON (UTF-8, no NaN or Infinity, not nested too deep)"
        ) from None
    if not isinstance(config, dict):
        raise _refuse(ADAPTER_CONFIG, "must be a JSON object")
    _check_storable(config)
    if not config.get("peft_type"):
        raise _refuse(ADAPTER_CONFIG, "peft_type is missing; is this a PEFT adapter config?")
    base = config.get("base_model_name_or_path")
    if not base:
        raise _refuse(
            ADAPTER_CONFIG,
            "base_model_name_or_path is missing; set it to the base model the adapter was trained on",
        )
    if not isinstance(base, str) or len(base) > MAX_BASE_MODEL_NAME:
        raise _refuse(
            ADAPTER_CONFIG,
            f"base_model_name_or_path must be a name of at most {MAX_BASE_MODEL_NAME} characters",
        )
    try:
        lora_rules.check_config(config, max_rank=max_rank)
    except lora_rules.AdapterRuleError as exc:
        raise _refuse(ADAPTER_CONFIG, str(exc)) from None
    return config


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_storable(config: dict[str, Any]) -> None:
    """Depth bounded, and no text a database column refuses (NUL, lone surrogates)."""
    stack: list[tuple[Any, int]] = [(config, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_CONFIG_DEPTH:
            raise _refuse(ADAPTER_CONFIG, f"nested deeper than {MAX_CONFIG_DEPTH} levels; not a PEFT config")
        if isinstance(value, dict):
            stack += [(key, depth) for key in value] + [(item, depth + 1) for item in value.values()]
        elif isinstance(value, list):
            stack += [(item, depth + 1) for item in value]
        elif isinstance(value, str) and ("\x00" in value or _has_surrogate(value)):
            raise _refuse(ADAPTER_CONFIG, "holds a NUL character or an unpaired surrogate")


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# --- adapter_model.safetensors ------------------------------------------------------------------


@dataclass(frozen=True)
class _Segment:
    """One tensor's bytes in the data section: [begin, end), read as `dtype` words."""

    begin: int
    end: int
    name: str
    dtype: str


def check_weights(
    chunks: Iterable[bytes],
    size: int,
    config: Mapping[str, Any],
    *,
    model_config: Mapping[str, Any] | None,
    max_rank: int,
) -> dict[str, Any]:
    """Reads the file once: its sha256, header checks, then every tensor scanned for NaN and Inf."""
    digest = hashlib.sha256()
    reader = _SafetensorsReader(
        size, lambda table, data: _segments(table, data, config, model_config, max_rank)
    )
    for chunk in chunks:
        digest.update(chunk)
        reader.feed(chunk)
    reader.finish()
    return {"size": size, "sha256": digest.hexdigest()}


class _SafetensorsReader:
    """A push parser: 8-byte header length, the JSON header, then the data section tensor by tensor."""

    def __init__(self, size: int, on_header: Any) -> None:
        self._size, self._on_header = size, on_header
        self._head = bytearray()
        self._need = 8
        self._scan: _FiniteScan | None = None

    def feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view and self._scan is None:
            take = self._need - len(self._head)
            self._head += view[:take]
            view = view[take:]
            if len(self._head) == self._need:
                self._advance()
        if view and self._scan is not None:
            self._scan.feed(view)

    def _advance(self) -> None:
        if self._need == 8:
            (length,) = struct.unpack("<Q", bytes(self._head))
            if length < 2 or length > MAX_HEADER_BYTES or length + 8 > self._size:
                raise _refuse(
                    ADAPTER_WEIGHTS,
                    f"not a safetensors file (header length {length} of a {self._size}-byte file)",
                )
            self._need = 8 + length
            return
        data_bytes = self._size - self._need
        self._scan = _FiniteScan(
            self._on_header(_parse_header(bytes(self._head[8:])), data_bytes), data_bytes
        )

    def finish(self) -> None:
        if self._scan is None or not self._scan.complete:
            raise _refuse(ADAPTER_WEIGHTS, f"truncated file ({self._size} bytes stated)")


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        table = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise _refuse(ADAPTER_WEIGHTS, "not a safetensors file (its header is not a JSON object)") from None
    if not isinstance(table, dict):
        raise _refuse(ADAPTER_WEIGHTS, "not a safetensors file (its header is not a JSON object)")
    return table


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    table = dict(pairs)
    if len(table) != len(pairs):
        raise ValueError("duplicate key")
    return table


def _segments(
    table: dict[str, Any],
    data_bytes: int,
    config: Mapping[str, Any],
    model_config: Mapping[str, Any] | None,
    max_rank: int,
) -> list[_Segment]:
    """The header's tensors, checked against the LoRA rules and tiling the data section exactly."""
    metadata = table.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _refuse(ADAPTER_WEIGHTS, "__metadata__ must map names to strings")
    if not table:
        raise _refuse(ADAPTER_WEIGHTS, "contains no tensors")
    if len(table) > MAX_TENSORS:
        raise _refuse(ADAPTER_WEIGHTS, f"{len(table)} tensors; a LoRA has at most {MAX_TENSORS}")
    specs = {name: _tensor_spec(name, spec, data_bytes) for name, spec in table.items()}
    try:
        lora_rules.check_tensors(
            {name: (dtype, shape) for name, (dtype, shape, _) in specs.items()},
            config,
            model_config=model_config,
            max_rank=max_rank,
        )
    except lora_rules.AdapterRuleError as exc:
        raise _refuse(ADAPTER_WEIGHTS, str(exc)) from None
    segments = sorted(
        (_Segment(begin, end, name, dtype) for name, (dtype, _, (begin, end)) in specs.items()),
        key=lambda s: (s.begin, s.end),
    )
    cursor = 0
    for segment in segments:
        if segment.begin != cursor:
            raise _refuse(ADAPTER_WEIGHTS, f"tensor {segment.name[:120]!r} overlaps another or leaves a gap")
        cursor = segment.end
    if cursor != data_bytes:
        raise _refuse(
            ADAPTER_WEIGHTS,
            f"the header describes {cursor} bytes of tensor data but the file has {data_bytes}",
        )
    return segments


def _tensor_spec(name: str, spec: Any, data_bytes: int) -> tuple[str, list[int], tuple[int, int]]:
    label = f"tensor {name[:120]!r}"
    if not isinstance(spec, dict):
        raise _refuse(ADAPTER_WEIGHTS, f"{label} is not described by an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _FLOATS:
        raise _refuse(
            ADAPTER_WEIGHTS, f"{label} has dtype {str(dtype)[:20]!r}; LoRA weights are F16, BF16, F32 or F64"
        )
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_count(d, MAX_DIMENSION) for d in shape):
        raise _refuse(ADAPTER_WEIGHTS, f"{label} has no valid shape")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o, data_bytes) for o in offsets)
    ):
        raise _refuse(ADAPTER_WEIGHTS, f"{label} has data_offsets outside the data section")
    begin, end = offsets
    itemsize = np.dtype(_FLOATS[dtype][0]).itemsize
    if end - begin != math.prod(shape) * itemsize:
        raise _refuse(
            ADAPTER_WEIGHTS, f"{label}: its data_offsets do not hold a {dtype} tensor of shape {shape}"
        )
    return dtype, shape, (begin, end)


def _is_count(value: Any, limit: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


class _FiniteScan:
    """Walks the data section in file order, checking each tensor's words as they stream past."""

    def __init__(self, segments: list[_Segment], data_bytes: int) -> None:
        self._segments, self._data_bytes = segments, data_bytes
        self._index, self._position = 0, 0
        self._carry = b""  # a word split across two chunks

    @property
    def complete(self) -> bool:
        return self._position == self._data_bytes

    def feed(self, view: memoryview) -> None:
        while view:
            if self._index >= len(self._segments):
                raise _refuse(ADAPTER_WEIGHTS, "the file is longer than its header says")
            segment = self._segments[self._index]
            take = min(len(view), segment.end - self._position)
            words, mask = _FLOATS[segment.dtype]
            piece = self._carry + bytes(view[:take])
            whole = len(piece) - len(piece) % np.dtype(words).itemsize
            values = np.frombuffer(piece, dtype=words, count=whole // np.dtype(words).itemsize)
            if np.any((values & mask) == mask):
                raise _refuse(
                    ADAPTER_WEIGHTS,
                    f"tensor {segment.name[:120]!r} holds NaN or infinite values; a served adapter must be "
                    "finite (retrain it, or fix the run that produced it)",
                )
            self._carry = piece[whole:]
            self._position += take
            view = view[take:]
            if self._position == segment.end:
                self._index += 1
