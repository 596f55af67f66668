"""`tuneforge.config_errors`: every config error names the field a user wrote, and only that."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest
from tuneforge import FinetuningConfig
from tuneforge.config_errors import config_errors


def _errors(params: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(pydantic.ValidationError) as caught:
        FinetuningConfig.model_validate(params)
    return config_errors(caught.value)


def test_a_value_fitting_no_member_of_a_union_is_one_error_on_the_field() -> None:
    [(field, message)] = _errors({"rank": "high"})
    assert field == "rank"
    assert "valid integer" in message and ", or " in message and "'auto'" in message


def test_nested_fields_keep_their_path_and_unknown_ones_list_their_siblings() -> None:
    assert _errors({"lr_scheduler": {"type": "wavy"}})[0][0] == "lr_scheduler.type"
    [(field, message)] = _errors({"lr_scheduler": {"type": "cosine", "warmup": 3}})
    assert field == "lr_scheduler.warmup"
    assert message == "unknown field; the accepted fields are min_lr_ratio, num_cycles, type"
    [(field, message)] = _errors({"learning_rat": 0.1})
    assert field == "learning_rat" and "learning_rate" in message and "seed" in message


def test_a_check_across_fields_has_no_field_and_its_message_names_one() -> None:
    [(field, message)] = _errors({"adapter": "full", "quantization_bits": 4})
    assert field == "" and message.startswith("quantization_bits: a 4-bit base")


def test_a_list_item_is_named_by_its_index() -> None:
    [(field, _)] = _errors({"target_modules": ["q_proj", 3]})
    assert field == "target_modules.1"


def test_num_devices_is_bounded_and_refuses_what_cannot_spread_over_devices() -> None:
    assert _errors({"num_devices": 0})[0][0] == "num_devices"
    assert _errors({"num_devices": 17})[0][0] == "num_devices"
    [(_, message)] = _errors({"adapter": "turbo_lora", "num_devices": 2})
    assert message.startswith("num_devices: adapter 'turbo_lora' trains its speculator on one device")
    # 8 rows in micro-batches of 4: two micro-batches cannot keep four devices busy.
    [(_, message)] = _errors({"num_devices": 4, "effective_batch_size": 8, "micro_batch_size": 4})
    assert message.startswith("num_devices: 4 devices need at least 4 micro-batches per step")
    config = FinetuningConfig(num_devices=4, effective_batch_size=8, micro_batch_size=2)
    assert "num_devices" not in config.trajectory_fields()  # a checkpoint resumes on any count
