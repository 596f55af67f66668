"""The adapter upload validator: valid PEFT LoRAs pass, every hostile or broken one is a 422 naming why."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
from adapter_file_builders import (
    TINY_CONFIG,
    as_dtype,
    chunked,
    framed,
    lora_config,
    lora_tensors,
    safetensors_bytes,
    weight_name,
)

from app.errors import InvalidInputError
from app.services.adapter_files.checks import MAX_CONFIG_DEPTH, check_weights, parse_config

MAX_RANK = 64


def _check(
    raw: bytes, config: dict[str, Any] | None = None, *, chunk: int = 1 << 16, known: bool = True
) -> dict[str, Any]:
    return check_weights(
        chunked(raw, chunk),
        len(raw),
        config or lora_config(),
        model_config=TINY_CONFIG if known else None,
        max_rank=MAX_RANK,
    )


def _refused(raw: bytes, fragment: str, config: dict[str, Any] | None = None, *, known: bool = True) -> None:
    with pytest.raises(InvalidInputError) as refused:
        _check(raw, config, known=known)
    assert refused.value.status_code == 422
    assert fragment in refused.value.message, refused.value.message


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32", "F64"])
@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_a_valid_lora_is_accepted_whatever_its_float_dtype_and_chunking(dtype: str, chunk: int) -> None:
    raw = safetensors_bytes(lora_tensors(dtype=dtype))
    checked = _check(raw, chunk=chunk)
    assert checked["size"] == len(raw) and len(checked["sha256"]) == 64


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32", "F64"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_non_finite_value_anywhere_is_refused_naming_its_tensor(dtype: str, bad: float) -> None:
    tensors = lora_tensors(dtype=dtype)
    name = weight_name(1, "v_proj", "A")
    _, shape, _ = tensors[name]
    values = np.ones(shape, dtype="float32")
    values[-1, -1] = bad
    tensors[name] = (dtype, shape, as_dtype(values, dtype))
    _refused(safetensors_bytes(tensors), f"{name!r} holds NaN or infinite values")


def test_a_wrong_input_dimension_is_refused_where_the_base_model_is_known() -> None:
    tensors = lora_tensors(targets=("q_proj",), layers=(0,))
    tensors[weight_name(0, "q_proj", "A")] = ("F32", [4, 48], as_dtype(np.ones((4, 48), "float32"), "F32"))
    raw = safetensors_bytes(tensors)
    _refused(raw, "its input has 64 features, not 48")
    assert _check(raw, known=False)["size"] == len(raw)  # unknown base model: checked at load


def test_a_layer_the_base_model_lacks_is_refused() -> None:
    _refused(safetensors_bytes(lora_tensors(layers=(0, 5))), "layer 5 does not exist")


def test_the_catastrophic_regex_alpha_pattern_is_refused_naming_the_field() -> None:
    raw = json.dumps(lora_config(alpha_pattern={"(.+)+!": 8})).encode()
    with pytest.raises(
        InvalidInputError, match=r"adapter_config\.json: alpha_pattern: .* is a regular expression"
    ):
        parse_config(raw, max_rank=MAX_RANK)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (lora_config(peft_type="PREFIX_TUNING"), "peft_type"),
        (lora_config(rank=MAX_RANK + 1), "r: 65 is not a rank in 1..64"),
        (lora_config(rank_pattern={"q_proj": 10_000}), "rank_pattern"),
        (lora_config(targets=("lm_head",)), "target_modules"),
        (lora_config(target_modules=".*proj"), "target_modules"),
        (lora_config(lora_alpha="big"), "lora_alpha"),
        (lora_config(base_model_name_or_path={"a": 1}), "base_model_name_or_path"),
        (lora_config(base_model_name_or_path="m" * 256), "base_model_name_or_path"),
        (lora_config(note="nul \x00 inside"), "NUL"),
    ],
)
def test_config_rules_are_422s_naming_the_field(config: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidInputError, match=r"adapter_config\.json") as refused:
        parse_config(json.dumps(config).encode(), max_rank=MAX_RANK)
    assert fragment in refused.value.message


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe not utf-8",
        b'{"peft_type": NaN}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"r": ' + b"9" * 5000 + b"}",
        b'{"peft_type": "LORA", "base_model_name_or_path": "m", "r": 1e400}',
        b'"just a string"',
    ],
    ids=["binary", "nan", "deep", "huge-int", "infinite-rank", "not-an-object"],
)
def test_config_files_that_are_not_configs_are_422s(raw: bytes) -> None:
    with pytest.raises(InvalidInputError, match=r"adapter_config\.json"):
        parse_config(raw, max_rank=MAX_RANK)


def test_config_nesting_is_bounded() -> None:
    nested: Any = 1
    for _ in range(MAX_CONFIG_DEPTH):
        nested = [nested]
    with pytest.raises(InvalidInputError, match="nested deeper"):
        parse_config(json.dumps(lora_config(extra=nested)).encode(), max_rank=MAX_RANK)


def test_tensor_rules_are_422s_naming_the_tensor() -> None:
    tensors = lora_tensors(targets=("q_proj",), layers=(0,))
    only_a = {k: v for k, v in tensors.items() if "lora_A" in k}
    _refused(safetensors_bytes(only_a), "has lora_A but no lora_B")
    _refused(
        safetensors_bytes(tensors), "rank 4, but adapter_config.json gives it rank 8", lora_config(rank=8)
    )
    wider = lora_tensors(rank=8, targets=("q_proj",), layers=(0,))
    mixed = {**tensors, weight_name(0, "q_proj", "B"): wider[weight_name(0, "q_proj", "B")]}
    _refused(safetensors_bytes(mixed), "lora_A has rank 4 but lora_B has rank 8")
    extra = {**tensors, "base_model.model.lm_head.weight": ("F32", [1, 1], b"\0" * 4)}
    _refused(safetensors_bytes(extra), "base_model.model.lm_head.weight: is not the lora_A or lora_B")
    not_targeted = lora_tensors(targets=("k_proj",), layers=(0,))
    _refused(safetensors_bytes(not_targeted), "k_proj is not among target_modules")
    integers = {k: ("I32", s, raw) for k, (_, s, raw) in tensors.items()}
    _refused(safetensors_bytes(integers), "dtype 'I32'")
    too_wide = lora_tensors(rank=MAX_RANK + 1, targets=("q_proj",), layers=(0,))
    _refused(safetensors_bytes(too_wide), "over the limit of 64", lora_config(rank=MAX_RANK))


def _header(raw: bytes) -> dict[str, Any]:
    (length,) = struct.unpack("<Q", raw[:8])
    header: dict[str, Any] = json.loads(raw[8 : 8 + length])
    return header


def test_offsets_must_tile_the_data_exactly() -> None:
    raw = safetensors_bytes(lora_tensors(targets=("q_proj",), layers=(0,)))
    header, data = _header(raw), raw[8 + struct.unpack("<Q", raw[:8])[0] :]
    a, b = weight_name(0, "q_proj", "A"), weight_name(0, "q_proj", "B")
    overlap = json.loads(json.dumps(header))
    overlap[b]["data_offsets"] = overlap[a]["data_offsets"]
    _refused(framed(json.dumps(overlap).encode(), data), "overlaps another or leaves a gap")
    _refused(raw + b"\0" * 8, "the header describes")
    _refused(raw[:-3], "outside the data section")
    lying = json.loads(json.dumps(header))
    lying[a]["shape"] = [4, 63]
    _refused(framed(json.dumps(lying).encode(), data), "do not hold a F32 tensor of shape [4, 63]")


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"", "truncated"),
        (b"\x00" * 64, "not a safetensors file"),
        (struct.pack("<Q", 1 << 40) + b"{}", "not a safetensors file"),
        (framed(b"[" * 50_000 + b"]" * 50_000), "header is not a JSON object"),
        (framed(b'{"a": 1, "a": 2}'), "header is not a JSON object"),
        (framed(b"\xff\xfe"), "header is not a JSON object"),
        (framed(b'{"__metadata__": {"format": "pt"}}'), "contains no tensors"),
        (framed(b'{"__metadata__": [1]}'), "__metadata__"),
        (
            framed(
                json.dumps(
                    {
                        weight_name(0, "q_proj", "A"): {
                            "dtype": "F32",
                            "shape": [True, 64],
                            "data_offsets": [0, 256],
                        }
                    }
                ).encode()
            ),
            "no valid shape",
        ),
        (
            framed(
                json.dumps(
                    {
                        weight_name(0, "q_proj", "A"): {
                            "dtype": "F32",
                            "shape": [4, 10**40],
                            "data_offsets": [0, 256],
                        }
                    }
                ).encode()
            ),
            "no valid shape",
        ),
    ],
    ids=[
        "empty",
        "zeros",
        "huge-header",
        "deep-header",
        "duplicate-keys",
        "binary-header",
        "no-tensors",
        "bad-metadata",
        "bool-dimension",
        "huge-dimension",
    ],
)
def test_malformed_weight_files_are_422s(raw: bytes, fragment: str) -> None:
    _refused(raw, fragment)
