"""Generated inputs for the adapter upload validator: whatever arrives, the answer is a 422 or an accept
(never another exception, which the API would turn into a 500), and a valid LoRA is always accepted."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.errors import InvalidInputError
from app.services.adapter_files.checks import check_weights, parse_config

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = ("F16", "BF16", "F32", "F64")

# JSON values with the awkward parts: huge and negative integers, floats, deep-ish nesting, odd text.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
tensor_names = st.sampled_from(
    [weight_name(layer, module, which) for layer in (0, 1, 7) for module in MODULES for which in "AB"]
    + ["base_model.model.lm_head.weight", "__metadata__", "", "layers.0.self_attn.q_proj.lora_A.weight"]
) | st.text(max_size=40)
dimensions = st.integers(min_value=-2, max_value=200) | st.sampled_from([10**12, 2**63, 1.5, True, "4"])
tensor_specs = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from([*DTYPES, "I32", "BOOL", "F8_E4M3", 7, None]),
        "shape": st.lists(dimensions, max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(min_value=-1, max_value=600), max_size=3) | json_values,
    },
)


def _outcome(raw: bytes, config: dict[str, Any], model_config: dict[str, Any] | None, chunk: int) -> str:
    try:
        check_weights(chunked(raw, chunk), len(raw), config, model_config=model_config, max_rank=16)
    except InvalidInputError as exc:
        assert exc.status_code == 422 and exc.message.startswith("adapter_model.safetensors: ")
        return "refused"
    return "accepted"


@FAST
@given(raw=st.binary(max_size=2048), chunk=st.integers(min_value=1, max_value=512))
def test_random_bytes_are_refused_or_accepted_never_an_error(raw: bytes, chunk: int) -> None:
    _outcome(raw, lora_config(), TINY_CONFIG, chunk)


@FAST
@given(
    table=st.dictionaries(tensor_names, tensor_specs | json_values, max_size=6),
    data=st.binary(max_size=600),
    chunk=st.integers(min_value=1, max_value=300),
    known=st.booleans(),
    depth=st.sampled_from([0, 0, 0, 10, 5000]),
)
def test_random_headers_are_refused_or_accepted_never_an_error(
    table: dict[str, Any], data: bytes, chunk: int, known: bool, depth: int
) -> None:
    header = json.dumps(table)
    if depth:  # one more entry, nested `depth` lists deep
        header = header[:-1] + (", " if table else "") + '"deep": ' + "[" * depth + "]" * depth + "}"
    raw = framed(header.encode(), data)
    _outcome(raw, lora_config(), TINY_CONFIG if known else None, chunk)


@FAST
@given(
    text=st.text(max_size=300) | json_values.map(json.dumps),
    encoding=st.sampled_from(["utf-8", "utf-16", "utf-32", "latin-1", "utf-8-sig"]),
    depth=st.integers(min_value=0, max_value=3000),
)
def test_any_config_file_is_a_422_or_a_config(text: str, encoding: str, depth: int) -> None:
    raw = "[" * depth + text + "]" * depth
    try:
        encoded = raw.encode(encoding)
    except UnicodeEncodeError:
        encoded = raw.encode("utf-8", "surrogatepass")
    try:
        parse_config(encoded, max_rank=16)
    except InvalidInputError as exc:
        assert exc.status_code == 422 and exc.message.startswith("adapter_config.json: ")


@FAST
@given(
    config=st.dictionaries(
        st.sampled_from(
            [
                "peft_type",
                "r",
                "lora_alpha",
                "target_modules",
                "rank_pattern",
                "alpha_pattern",
                "base_model_name_or_path",
                "other",
            ]
        ),
        json_values,
    ),
)
def test_any_config_object_is_a_422_or_a_config(config: dict[str, Any]) -> None:
    try:
        parse_config(json.dumps(config).encode(), max_rank=16)
    except InvalidInputError as exc:
        assert exc.message.startswith("adapter_config.json: ")


valid_adapters = st.fixed_dictionaries(
    {
        "rank": st.integers(min_value=1, max_value=16),
        "targets": st.lists(st.sampled_from(MODULES), min_size=1, max_size=7, unique=True).map(tuple),
        "layers": st.lists(st.sampled_from((0, 1)), min_size=1, max_size=2, unique=True).map(tuple),
        "dtype": st.sampled_from(DTYPES),
        "seed": st.integers(min_value=0, max_value=2**32 - 1),
    }
)


@FAST
@given(
    adapter=valid_adapters,
    chunk=st.integers(min_value=1, max_value=5000),
    known=st.booleans(),
    metadata=st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=3),
)
def test_a_valid_lora_is_always_accepted(
    adapter: dict[str, Any], chunk: int, known: bool, metadata: dict[str, str]
) -> None:
    raw = safetensors_bytes(lora_tensors(**adapter), metadata=metadata)
    config = lora_config(rank=adapter["rank"], targets=adapter["targets"])
    config = parse_config(json.dumps(config).encode(), max_rank=16)
    assert _outcome(raw, config, TINY_CONFIG if known else None, chunk) == "accepted"


@FAST
@given(
    adapter=valid_adapters,
    position=st.floats(min_value=0, max_value=1, exclude_max=True),
    bad=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
    chunk=st.integers(min_value=1, max_value=5000),
)
def test_a_lora_with_one_non_finite_value_is_always_refused(
    adapter: dict[str, Any], position: float, bad: float, chunk: int
) -> None:
    tensors = lora_tensors(**adapter)
    name = list(tensors)[int(position * len(tensors))]
    dtype, shape, _ = tensors[name]
    values = np.ones(int(np.prod(shape)), dtype="float32")
    values[int(position * values.size)] = bad
    tensors[name] = (dtype, shape, as_dtype(values.reshape(shape), dtype))
    raw = safetensors_bytes(tensors)
    config = lora_config(rank=adapter["rank"], targets=adapter["targets"])
    assert _outcome(raw, config, TINY_CONFIG, chunk) == "refused"
