"""`tuneforge.finetuning`: a config is checked and trimmed locally, before any request is sent."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from tuneforge import FinetuningConfig, Tuneforge, ValidationError
from tuneforge.finetuning import finetuning_params


def test_a_config_object_sends_only_the_fields_set_and_always_the_base_model() -> None:
    config = FinetuningConfig(base_model="tiny-random-llama", train_steps=4, micro_batch_size=2)
    assert finetuning_params(config) == {
        "base_model": "tiny-random-llama",
        "train_steps": 4,
        "micro_batch_size": 2,
    }


def test_a_config_built_without_validation_still_sends_its_base_model() -> None:
    config = FinetuningConfig.model_construct(_fields_set=set(), base_model="tiny-random-llama")
    assert finetuning_params(config) == {"base_model": "tiny-random-llama"}


def test_a_dict_is_validated_and_sent_as_json_values() -> None:
    params = finetuning_params(
        {"base_model": "smollm2-135m", "lr_scheduler": {"type": "cosine"}, "target_modules": ["q_proj"]}
    )
    assert params == {
        "base_model": "smollm2-135m",
        "lr_scheduler": {"type": "cosine"},
        "target_modules": ["q_proj"],
    }


def test_predibase_string_spellings_are_sent_as_objects() -> None:
    params = finetuning_params({"base_model": "m", "lr_scheduler": "cosine", "optimizer": "sgd"})
    assert (params["lr_scheduler"], params["optimizer"]) == ({"type": "cosine"}, {"type": "sgd"})


def test_continuing_from_a_version_needs_no_base_model_and_sends_none() -> None:
    assert finetuning_params({"train_steps": 5}, continuing=True) == {"train_steps": 5}
    assert finetuning_params(FinetuningConfig(train_steps=5), continuing=True) == {"train_steps": 5}
    given = finetuning_params({"base_model": "m", "train_steps": 5}, continuing=True)
    assert given == {"base_model": "m", "train_steps": 5}


def test_continuing_still_refuses_a_bad_field_but_leaves_cross_field_checks_to_the_server() -> None:
    with pytest.raises(ValidationError, match="invalid fine-tuning config: learning_rate: "):
        finetuning_params({"learning_rate": -1}, continuing=True)
    # With the parent's micro_batch_size (unknown here) this may well be consistent.
    assert finetuning_params({"effective_batch_size": 2}, continuing=True) == {"effective_batch_size": 2}
    with pytest.raises(ValidationError, match="effective_batch_size"):
        finetuning_params({"base_model": "m", "effective_batch_size": 2})


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"base_model": "m", "learning_rate": -1}, "learning_rate"),
        ({"base_model": "m", "rank": "high"}, "rank"),
        ({"base_model": "m", "adapter": "qlora"}, "adapter"),
        ({"base_model": "m", "micro_batch_size": 4, "effective_batch_size": 2}, "effective_batch_size"),
        ({"base_model": "m", "learning_rat": 0.1}, "learning_rat"),
        ({"learning_rate": 0.1}, "base_model"),
        ({"base_model": "m", "adapter": "full", "quantization_bits": 4}, "quantization_bits"),
    ],
    ids=[
        "out-of-range",
        "wrong-type",
        "unsupported-adapter",
        "cross-field",
        "misspelt",
        "missing",
        "method-check",
    ],
)
def test_a_bad_field_in_a_dict_raises_validation_error_naming_it(
    config: dict[str, object], field: str
) -> None:
    # A check across fields reads "field (value) must ..."; the rest "field: message".
    with pytest.raises(ValidationError, match=rf"invalid fine-tuning config: {field}[: ]") as caught:
        finetuning_params(config)
    assert caught.value.status is None  # the client's own check, not a server answer


def test_a_config_of_another_type_is_refused() -> None:
    with pytest.raises(ValidationError, match="expected a FinetuningConfig or a dict, not list"):
        finetuning_params([("base_model", "m")])  # type: ignore[arg-type]


@pytest.fixture
def silent_listener() -> Iterator[socket.socket]:
    """A port that accepts TCP connections but never answers; any request shows up in its backlog."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        yield listener


def test_adapters_create_refuses_a_bad_dict_before_any_request(silent_listener: socket.socket) -> None:
    port = silent_listener.getsockname()[1]
    with Tuneforge(api_token="pb_x", base_url=f"http://127.0.0.1:{port}", timeout=2.0, max_retries=0) as pb:
        with pytest.raises(ValidationError, match="learning_rate"):
            pb.adapters.create(
                config={"base_model": "tiny-random-llama", "learning_rate": 0}, dataset="qa", repo="r"
            )
        with pytest.raises(ValidationError, match="base_model: required"):
            pb.adapters.create(config={"train_steps": 3}, dataset="qa", repo="r")
        for bad in ("r", "r/1@", "r/1@last", "r/x@3"):
            with pytest.raises(ValidationError, match=f"{bad!r}"):
                pb.finetuning.jobs.create(
                    config={"base_model": "tiny-random-llama"},
                    dataset="qa",
                    repo="r",
                    continue_from_version=bad,
                )
    with pytest.raises(BlockingIOError):  # nothing ever connected
        silent_listener.accept()
