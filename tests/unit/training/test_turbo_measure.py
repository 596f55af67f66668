"""The worker's measurement of a published turbo artifact (worker.turbo_measure): the serving engine
decodes the run's held-out prompts with and without the heads, and the result lands in the summary."""

import os

# Before transformers is imported: nothing in these tests may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from training_support import TINY, make_config, number_rows

from worker import turbo_measure
from worker.training.base_models import resolve_base_model
from worker.training.loop import TrainingResult, train

MEASURED_KEYS = {"prompts", "max_new_tokens", "plain_tokens_per_s", "speculative_tokens_per_s", "speedup",
                 "mean_accepted_length", "acceptance_rate", "identical_outputs"}  # fmt: skip


def check_measured(measured: dict[str, Any], eval_rows: int) -> None:
    """Structure and sanity only: timings vary from machine to machine and are never compared."""
    assert set(measured) == MEASURED_KEYS
    assert (
        measured["prompts"] == min(eval_rows, turbo_measure.MAX_PROMPTS) and measured["max_new_tokens"] == 32
    )
    assert measured["plain_tokens_per_s"] > 0 and measured["speculative_tokens_per_s"] > 0
    assert measured["speedup"] > 0
    # Greedy speculation emits exactly what plain greedy decoding does.
    assert measured["identical_outputs"] == measured["prompts"]
    # Drafts were proposed and some kept: the speculative pass really ran with the heads.
    assert measured["mean_accepted_length"] > 1 and 0 < measured["acceptance_rate"] <= 1


def turbo_run(adapter: str, tiny_cache: Path, output_dir: Path, **overrides: Any) -> TrainingResult:
    config = make_config(adapter=adapter, speculator_architecture="medusa", **overrides)
    return train(config, number_rows(), output_dir=output_dir, cache_dir=tiny_cache)


@pytest.fixture(scope="module")
def turbo_lora_result(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainingResult:
    return turbo_run("turbo_lora", tiny_cache, tmp_path_factory.mktemp("turbo-lora"), train_steps=8)


def test_the_speedup_is_measured_in_the_serving_engine_and_written_to_the_summary(
    turbo_lora_result: TrainingResult, tmp_path: Path
) -> None:
    result = turbo_lora_result
    assert result.adapter_dir is not None and result.data.eval_rows > 0
    turbo_measure.add_to_summary(result)
    summary = json.loads((result.adapter_dir / "training_summary.json").read_text())
    measured = summary["speculator"]["measured"]
    check_measured(measured, result.data.eval_rows)
    assert result.summary["speculator"]["measured"] == measured
    # The rest of the summary is what training wrote.
    assert summary["speculator"]["head_top1_accuracy"] == result.summary["speculator"]["head_top1_accuracy"]
    assert summary["result"] == json.loads(json.dumps(result.summary["result"]))


def test_a_failed_measurement_is_recorded_and_leaves_the_threads_as_they_were(
    turbo_lora_result: TrainingResult, tiny_cache: Path, tmp_path: Path
) -> None:
    result = turbo_lora_result
    assert result.adapter_dir is not None
    broken = tmp_path / "adapter"
    broken.mkdir()
    for path in result.adapter_dir.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    threads = torch.get_num_threads()
    measured = turbo_measure.measure(
        broken, resolve_base_model(TINY, tiny_cache), [[1, 5, 9]], dtype="fp32", device="cpu"
    )
    assert set(measured) == {"error"} and "cannot be served" in measured["error"]
    assert torch.get_num_threads() == threads


def test_heads_on_the_base_model_are_timed_against_the_base_model(tiny_cache: Path, tmp_path: Path) -> None:
    result = turbo_run("turbo", tiny_cache, tmp_path, train_steps=6, speculator_heads=2)
    assert result.adapter_dir is not None
    turbo_measure.add_to_summary(result)
    # Without the heads, the base model itself decodes (the artifact has no LoRA).
    summary = json.loads((result.adapter_dir / "training_summary.json").read_text())
    check_measured(summary["speculator"]["measured"], result.data.eval_rows)


def test_a_run_without_a_speculator_is_left_as_training_wrote_it(tiny_cache: Path, tmp_path: Path) -> None:
    result = train(make_config(train_steps=2), number_rows(), output_dir=tmp_path, cache_dir=tiny_cache)
    assert result.adapter_dir is not None and result.held_out_prompts
    summary_file = result.adapter_dir / "training_summary.json"
    written = summary_file.read_bytes()
    assert json.loads(written)["speculator"] is None
    turbo_measure.add_to_summary(result)
    assert summary_file.read_bytes() == written and result.summary["speculator"] is None
