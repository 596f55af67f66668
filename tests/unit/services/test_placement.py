"""Placement by memory: the smallest worker class that holds a job, checkpointing turned on when that
makes the fit, a 422 with the numbers when nothing does, and the settings that describe the classes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from tuneforge.config import FinetuningConfig
from tuneforge.rules import memory

from app.errors import InvalidInputError
from app.services import placement
from app.settings import Settings
from worker.celery_app import make_celery, train_queues

TINY = "tiny-random-llama"
# A Llama-3-8B-shaped config.json (GQA, untied head).
LLAMA_8B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """An operator's local model directory (an `extra_base_models` entry) holding only its config."""
    directory = tmp_path / "llama-8b"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(LLAMA_8B))
    return directory


def _settings(tmp_path: Path, model_dir: Path, classes: list[dict[str, Any]], **more: Any) -> Settings:
    return Settings(
        data_dir=tmp_path / "data", extra_base_models=[str(model_dir)], worker_classes=classes, **more
    )


def _config(model_dir: Path, **params: Any) -> FinetuningConfig:
    return FinetuningConfig(base_model=str(model_dir), max_seq_length=2048, micro_batch_size=4, **params)


def _config_json(model_dir: Path) -> dict[str, Any]:
    return dict(json.loads((model_dir / "config.json").read_text()))


def _gib(n_bytes: int, scale: float) -> float:
    return n_bytes * scale / memory.GIB


def test_the_smallest_class_that_holds_the_job_gets_it(tmp_path: Path, model_dir: Path) -> None:
    config = _config(model_dir, gradient_checkpointing=True)  # already as small as it gets
    needed = memory.estimate(LLAMA_8B, config).total
    classes = [
        {"name": "huge", "memory_gib": _gib(needed, 4)},
        {"name": "too-small", "memory_gib": _gib(needed, 0.5)},
        {"name": "snug", "memory_gib": _gib(needed, 1.1), "device_count": 2},
        {"name": "snug-one", "memory_gib": _gib(needed, 1.1)},
    ]
    placed = placement.place(
        _settings(tmp_path, model_dir, classes), config, str(model_dir), _config_json(model_dir)
    )
    # Equal memory per device: the class with fewer devices.
    assert placed.worker_class == "snug-one" and not placed.turned_on_checkpointing
    assert placed.config == config
    assert placed.record["estimate"]["total_bytes"] == needed
    assert (
        placed.record["estimate"]["parts"]["base_weights"]
        == 2 * memory.ModelShape.from_config(LLAMA_8B).total_params()
    )


def test_gradient_checkpointing_is_turned_on_when_that_is_what_makes_the_job_fit(
    tmp_path: Path, model_dir: Path
) -> None:
    config = _config(model_dir)
    plain = memory.estimate(LLAMA_8B, config).total
    checkpointed = memory.estimate(LLAMA_8B, config, gradient_checkpointing=True).total
    assert checkpointed < plain / 2
    between = (checkpointed + plain) / 2 / memory.GIB
    settings = _settings(tmp_path, model_dir, [{"name": "mid", "memory_gib": between}])
    placed = placement.place(settings, config, str(model_dir), _config_json(model_dir))
    assert placed.worker_class == "mid" and placed.turned_on_checkpointing
    assert placed.config.gradient_checkpointing and not config.gradient_checkpointing
    assert placed.record["estimate"]["total_bytes"] == checkpointed


def test_a_job_no_class_holds_is_refused_with_the_numbers_and_what_to_change(
    tmp_path: Path, model_dir: Path
) -> None:
    config = _config(model_dir)
    settings = _settings(
        tmp_path, model_dir, [{"name": "a10", "memory_gib": 24}, {"name": "l4", "memory_gib": 22}]
    )
    with pytest.raises(InvalidInputError) as refused:
        placement.place(settings, config, str(model_dir), _config_json(model_dir))
    message = str(refused.value)
    needed = memory.estimate(LLAMA_8B, config).total / memory.GIB
    assert f"needs ~{needed:.1f} GiB per device" in message
    assert "the largest worker class (a10) has 24 GiB per device" in message
    assert "`quantization_bits: 4`" in message and "`gradient_checkpointing: true`" in message
    assert "a smaller `micro_batch_size`" in message
    # And the advice is sound: a 4-bit base, checkpointing and single-row micro-batches fit 24 GiB.
    advised = config.model_copy(
        update={"quantization_bits": 4, "gradient_checkpointing": True, "micro_batch_size": 1}
    )
    assert placement.place(settings, advised, str(model_dir), _config_json(model_dir)).worker_class in (
        "a10",
        "l4",
    )


def test_without_classes_every_job_stays_on_the_train_queue_with_its_estimate_recorded(
    tmp_path: Path, model_dir: Path
) -> None:
    settings = _settings(tmp_path, model_dir, [])
    placed = placement.place(settings, _config(model_dir), str(model_dir), _config_json(model_dir))
    assert placed.worker_class is None and placed.record["estimate"]["total_bytes"] > 0
    assert placement.queue_for(settings, placed.worker_class) == settings.train_queue == "tuneforge.train"


def test_a_model_whose_config_is_unknown_goes_to_the_default_queue_unestimated(
    tmp_path: Path, model_dir: Path
) -> None:
    settings = _settings(tmp_path, model_dir, [{"name": "small", "memory_gib": 1}])
    # The built-in is not in this control plane's model cache yet: its config is unknown.
    placed = placement.place(settings, FinetuningConfig(base_model=TINY), TINY, None)
    assert placed.worker_class is None and placed.record["estimate"] is None
    assert placed.record["reason"].startswith("estimate unavailable")


def test_a_worker_of_a_class_consumes_that_classs_train_queue(tmp_path: Path, model_dir: Path) -> None:
    classes = [{"name": "a100-80", "memory_gib": 80}, {"name": "l4", "memory_gib": 22}]
    small = _settings(tmp_path, model_dir, classes, worker_class="l4")
    assert train_queues(small) == [make_celery(small).conf.task_default_queue] == ["tuneforge.train.l4"]
    assert placement.queue_for(small, "l4") == "tuneforge.train.l4"
    # The largest class also takes the jobs nothing could estimate (the default queue).
    large = _settings(tmp_path, model_dir, classes, worker_class="a100-80")
    assert train_queues(large) == ["tuneforge.train.a100-80", "tuneforge.train"]
    assert train_queues(_settings(tmp_path, model_dir, classes)) == ["tuneforge.train"]


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"worker_classes": [{"name": "a", "memory_gib": 8}, {"name": "a", "memory_gib": 16}]},
         "worker_classes", "given twice"),
        ({"worker_classes": [{"name": "a", "memory_gib": 8}], "worker_class": "b"}, "worker_class",
         "not one of worker_classes (a)"),
        ({"worker_class": "b"}, "worker_class", "none are configured"),
        ({"worker_classes": [{"name": "A.B", "memory_gib": 8}]}, "worker_classes.0.name", "pattern"),
        ({"worker_classes": [{"name": "a", "memory_gib": 0}]}, "worker_classes.0.memory_gib",
         "greater than 0"),
        ({"worker_classes": [{"name": "a", "memory_gib": 8, "device": "tpu"}]}, "worker_classes.0.device",
         "'cuda' or 'cpu'"),
        ({"worker_classes": [{"name": "a", "memory_gib": 8, "device_count": 0}]},
         "worker_classes.0.device_count", "greater than or equal to 1"),
    ],
)  # fmt: skip
def test_bad_worker_class_settings_name_the_field(
    tmp_path: Path, fields: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(data_dir=tmp_path, **fields)
    assert field in str(refused.value) and message in str(refused.value)


def test_worker_classes_come_from_json_in_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TUNEFORGE_WORKER_CLASSES", '[{"name": "cpu-64", "device": "cpu", "memory_gib": 64}]')
    monkeypatch.setenv("TUNEFORGE_WORKER_CLASS", "cpu-64")
    settings = Settings(data_dir=tmp_path)
    assert [(c.name, c.device, c.memory_gib, c.device_count) for c in settings.worker_classes] == [
        ("cpu-64", "cpu", 64, 1)
    ]
    assert train_queues(settings) == ["tuneforge.train.cpu-64", "tuneforge.train"]
    monkeypatch.setenv("TUNEFORGE_WORKER_CLASS", "")
    assert Settings(data_dir=tmp_path).worker_class is None
