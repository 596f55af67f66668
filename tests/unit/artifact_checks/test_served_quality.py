"""The version's quality report as the deployment answers it (worker.artifact_checks.served_quality): the
answers in the report are the serving engine's, for base and adapter, and equal what the serving HTTP app
returns to a client asking the same rows."""

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from artifact_checks_support import TINY, make_config, number_rows
from fastapi.testclient import TestClient

from worker import artifact_checks
from worker.artifact_checks import served_quality
from worker.artifact_checks.served_engine import DEPLOYMENT_DTYPE
from worker.serving.adapters import LocalDirectorySource
from worker.serving.async_engine import AsyncEngine
from worker.serving.engine import EngineConfig
from worker.serving.metrics import ServingMetrics
from worker.serving.server import build_app
from worker.serving.tenant_auth import TrustedTenant
from worker.training.loop import TrainingResult, train
from worker.training.quality import Sample, answer_tokens

ROWS = number_rows()
HELD_OUT = [row for row in ROWS if row["split"] == "evaluation"]
ADAPTER_ID = "quality/1"


@pytest.fixture(scope="module", params=[True, False], ids=["chat-template", "plain-prompt"])
def lora_result(
    request: pytest.FixtureRequest, tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> TrainingResult:
    """A LoRA trained as a user's job trains it (dtype auto: bf16 where the CPU computes it natively),
    with its prompts in the model's chat template or as plain text, its held-out rows answered by the glue.
    The tiny random model repeats one token: answers run to their token budget, so a budget off by one
    shows."""
    out = tmp_path_factory.mktemp("lora")
    config = make_config(train_steps=10, apply_chat_template=request.param)
    result = train(config, ROWS, output_dir=out, cache_dir=tiny_cache)
    assert result.adapter_dir is not None and len(result.held_out_answers) == len(HELD_OUT)
    artifact_checks.add_to_summary(result)
    return result


@pytest.fixture(scope="module")
def deployment(lora_result: TrainingResult, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The serving HTTP app over the base model, with the published artifact as an adapter, configured as
    the control plane's `tuneforge serve` is (its default dtype, the default batch and adapter limits)."""
    assert lora_result.adapter_dir is not None
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(lora_result.adapter_dir, root / ADAPTER_ID)
    config = EngineConfig(model_path=lora_result.model_dir, model_name=TINY, dtype=DEPLOYMENT_DTYPE)
    engine = AsyncEngine(config, source=LocalDirectorySource(root), metrics=ServingMetrics())
    engine.start()
    try:
        with TestClient(build_app(engine, tenants=TrustedTenant("dev"))) as client:
            yield client
    finally:
        engine.shutdown()


def _ask(client: TestClient, result: TrainingResult, model: str, prompt: str, max_tokens: int) -> str:
    """What a client of the deployment reads, greedy: a chat with the row's prompt as the user's message
    where training used the chat template, else a completion of the prompt text."""
    body: dict[str, Any] = {"model": model, "temperature": 0, "max_tokens": max_tokens}
    if result.summary["config_used"]["apply_chat_template"]:
        response = client.post(
            "/v1/chat/completions", json=body | {"messages": [{"role": "user", "content": prompt}]}
        )
        assert response.status_code == 200, response.text
        return str(response.json()["choices"][0]["message"]["content"])
    response = client.post("/v1/completions", json=body | {"prompt": prompt})
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def test_the_reports_answers_are_the_deployments_greedy_answers(
    lora_result: TrainingResult, deployment: TestClient
) -> None:
    report = lora_result.summary["quality_report"]
    assert report["answered_by"] == {
        "engine": "serving",
        "dtype": "fp32",
        "device": "cpu",
        "rows": len(HELD_OUT),
    }
    answers = report["answers"]
    assert len(answers) == len(HELD_OUT)
    for row, answer, (_, reference) in zip(HELD_OUT, answers, lora_result.held_out_answers, strict=True):
        assert row["prompt"] in answer["prompt"] and answer["expected"] == row["completion"]
        budget = answer_tokens(reference)
        assert _ask(deployment, lora_result, "", row["prompt"], budget).strip() == answer["base"]
        assert _ask(deployment, lora_result, ADAPTER_ID, row["prompt"], budget).strip() == answer["adapter"]
    # The exact-match scores count those same answers.
    adapter = report["exact_match"]["adapter"]
    assert adapter["correct"] == sum(answer["adapter_correct"] for answer in answers)
    assert report["exact_match"]["base"]["correct"] == sum(answer["base_correct"] for answer in answers)
    # What training measured stays: the eval losses, and the summary line over the served answers.
    assert report["eval_loss"]["adapter"] == lora_result.eval_loss_after
    assert f"on {len(HELD_OUT)} held-out rows" in report["summary"]


def test_the_report_is_written_into_the_artifacts_summary(lora_result: TrainingResult) -> None:
    assert lora_result.adapter_dir is not None
    written = json.loads((lora_result.adapter_dir / "training_summary.json").read_text())
    assert written["quality_report"] == json.loads(json.dumps(lora_result.summary["quality_report"]))


def test_a_whole_model_is_answered_as_a_model_of_its_own(tiny_cache: Path, tmp_path: Path) -> None:
    config = make_config(adapter="last_layer", train_steps=2, dtype="fp32")
    result = train(config, ROWS, output_dir=tmp_path, cache_dir=tiny_cache)
    artifact_checks.add_to_summary(result)
    report = result.summary["quality_report"]
    assert report["answered_by"]["engine"] == "serving" and report["answered_by"]["rows"] == len(HELD_OUT)
    # Training has no base-model score for a whole model; the serving engine has.
    assert report["exact_match"]["base"] is not None
    assert all(row["base"] is not None and row["adapter"] is not None for row in report["answers"])


def test_an_artifact_the_engine_cannot_serve_keeps_trainings_answers_and_says_why(
    tiny_cache: Path, tmp_path: Path
) -> None:
    result = train(
        make_config(adapter="dora", train_steps=2), ROWS, output_dir=tmp_path, cache_dir=tiny_cache
    )
    trained = json.loads(json.dumps(result.summary["quality_report"]))
    artifact_checks.add_to_summary(result)
    report = result.summary["quality_report"]
    answered_by = report.pop("answered_by")
    assert answered_by["engine"] == "training" and "DoRA" in answered_by["error"]
    assert answered_by["dtype"] == result.summary["runtime"]["dtype"]
    assert answered_by["rows"] == trained["exact_match"]["adapter"]["rows"]
    samples = trained["exact_match"]["adapter"]["samples"]
    assert [row["adapter"] for row in report.pop("answers")] == [sample["prediction"] for sample in samples]
    assert report == trained


def test_a_run_without_held_out_rows_is_left_as_training_wrote_it(tiny_cache: Path, tmp_path: Path) -> None:
    rows = [{key: value for key, value in row.items() if key != "split"} for row in ROWS]
    result = train(
        make_config(train_steps=2, eval_fraction=0), rows, output_dir=tmp_path, cache_dir=tiny_cache
    )
    assert result.adapter_dir is not None and not result.held_out_answers
    written = (result.adapter_dir / "training_summary.json").read_bytes()
    artifact_checks.add_to_summary(result)
    assert (result.adapter_dir / "training_summary.json").read_bytes() == written
    assert "answered_by" not in result.summary["quality_report"]


def test_the_answers_table_lists_at_most_its_rows_in_held_out_order() -> None:
    def sample(i: int, correct: bool) -> Sample:
        return Sample(f"prompt {i}", f"{i}", f"{i}" if correct else "?", correct)

    tuned = [sample(i, True) for i in range(served_quality.ANSWER_ROWS + 5)]
    rows: list[dict[str, Any]] = served_quality.answer_rows([sample(i, False) for i in range(3)], tuned)
    assert len(rows) == served_quality.ANSWER_ROWS
    assert [row["prompt"] for row in rows] == [f"prompt {i}" for i in range(served_quality.ANSWER_ROWS)]
    assert rows[0] == {"prompt": "prompt 0", "expected": "0", "base": "?", "adapter": "0",
                       "base_correct": False, "adapter_correct": True}  # fmt: skip
    # Rows past the base model's answers have none.
    assert rows[3]["base"] is None and rows[3]["base_correct"] is None
