"""The worker's measurement of a published turbo artifact (worker.artifact_checks.speedup): the serving
engine decodes the run's held-out prompts with and without the heads, and the result lands in the
summary."""

import copy
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from artifact_checks_support import make_config, number_rows

from worker import artifact_checks
from worker.artifact_checks import speedup
from worker.training.loop import TrainingResult, train

MEASURED_KEYS = {"prompts", "max_new_tokens", "plain_tokens_per_s", "speculative_tokens_per_s", "speedup",
                 "mean_accepted_length", "acceptance_rate", "identical_outputs", "engine"}  # fmt: skip


def check_measured(measured: dict[str, Any], eval_rows: int) -> None:
    """Structure and sanity only: timings vary from machine to machine and are never compared."""
    assert set(measured) == MEASURED_KEYS
    assert measured["prompts"] == min(eval_rows, speedup.MAX_PROMPTS) and measured["max_new_tokens"] == 32
    assert measured["plain_tokens_per_s"] > 0 and measured["speculative_tokens_per_s"] > 0
    assert measured["speedup"] > 0
    assert measured["engine"] == {"dtype": "fp32", "device": "cpu", "batch_size": 1, "temperature": 0.0}
    # Greedy speculation emits exactly what plain greedy decoding does.
    assert measured["identical_outputs"] == measured["prompts"]
    # Drafts were proposed and some kept: the speculative pass really ran with the heads.
    assert measured["mean_accepted_length"] > 1 and 0 < measured["acceptance_rate"] <= 1


def turbo_run(adapter: str, tiny_cache: Path, output_dir: Path, **overrides: Any) -> TrainingResult:
    config = make_config(adapter=adapter, speculator_architecture="medusa", dtype="fp32", **overrides)
    return train(config, number_rows(), output_dir=output_dir, cache_dir=tiny_cache)


@pytest.fixture(scope="module")
def turbo_lora_result(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainingResult:
    return turbo_run("turbo_lora", tiny_cache, tmp_path_factory.mktemp("turbo-lora"), train_steps=8)


def test_the_speedup_is_measured_in_the_serving_engine_and_written_to_the_summary(
    turbo_lora_result: TrainingResult,
) -> None:
    result = dataclasses.replace(turbo_lora_result, summary=copy.deepcopy(turbo_lora_result.summary))
    assert result.adapter_dir is not None and result.data.eval_rows > 0
    artifact_checks.add_to_summary(result)
    summary = json.loads((result.adapter_dir / "training_summary.json").read_text())
    measured = summary["speculator"]["measured"]
    check_measured(measured, result.data.eval_rows)
    assert result.summary["speculator"]["measured"] == measured
    # The same engine load answered the quality report.
    assert summary["quality_report"]["answered_by"]["engine"] == "serving"
    # The rest of the summary is what training wrote.
    assert summary["speculator"]["head_top1_accuracy"] == result.summary["speculator"]["head_top1_accuracy"]
    assert summary["result"] == json.loads(json.dumps(result.summary["result"]))


def test_a_failed_measurement_is_recorded_and_leaves_the_threads_as_they_were(
    turbo_lora_result: TrainingResult, tmp_path: Path
) -> None:
    assert turbo_lora_result.adapter_dir is not None
    broken = tmp_path / "adapter"
    shutil.copytree(turbo_lora_result.adapter_dir, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    result = dataclasses.replace(
        turbo_lora_result, adapter_dir=broken, summary=copy.deepcopy(turbo_lora_result.summary)
    )
    threads = torch.get_num_threads()
    artifact_checks.add_to_summary(result)
    measured = result.summary["speculator"]["measured"]
    assert set(measured) == {"error"} and "cannot be served" in measured["error"]
    assert torch.get_num_threads() == threads
    # The quality report could not be answered by the engine either: training's answers stay, and say so.
    answered_by = result.summary["quality_report"]["answered_by"]
    assert answered_by["engine"] == "training" and "cannot be served" in answered_by["error"]


def test_heads_on_the_base_model_are_timed_against_the_base_model(tiny_cache: Path, tmp_path: Path) -> None:
    result = turbo_run("turbo", tiny_cache, tmp_path, train_steps=6, speculator_heads=2)
    assert result.adapter_dir is not None
    artifact_checks.add_to_summary(result)
    # Without the heads, the base model itself decodes (the artifact has no LoRA).
    summary = json.loads((result.adapter_dir / "training_summary.json").read_text())
    check_measured(summary["speculator"]["measured"], result.data.eval_rows)
    # Heads never change a greedy answer: the artifact answers what the base model answers.
    answers = summary["quality_report"]["answers"]
    assert answers and all(row["adapter"] == row["base"] for row in answers)


def test_a_run_without_a_speculator_gets_no_timing(tiny_cache: Path, tmp_path: Path) -> None:
    result = train(
        make_config(train_steps=2, dtype="fp32"), number_rows(), output_dir=tmp_path, cache_dir=tiny_cache
    )
    assert result.adapter_dir is not None and result.held_out_prompts
    artifact_checks.add_to_summary(result)
    summary = json.loads((result.adapter_dir / "training_summary.json").read_text())
    assert summary["speculator"] is None and result.summary["speculator"] is None
    assert summary["quality_report"]["answered_by"]["engine"] == "serving"
