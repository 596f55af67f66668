"""The accepted length recorded in training is the one the serving engine then measures: on the demo
task (smollm2-135m, real weights), the training-time replay agrees with the engine within 10%."""

from pathlib import Path

import pytest

from app.demo.dataset import demo_rows
from app.demo.job import demo_config
from worker import artifact_checks
from worker.training.loop import train

SPECULATOR_STEPS = 32  # enough for drafts to be accepted: away from 1.0, where any two estimates agree
TRAIN_ROWS = 96  # fewer than steps x batch: the frozen model's features are cached, so steps are cheap
PROMPTS = 8  # the engine's measurement decodes at most this many


@pytest.mark.timeout(900)
def test_the_recorded_estimate_equals_the_engines_measurement_on_the_demo_task(
    tmp_path: Path, shared_model_cache: Path
) -> None:
    demo = demo_config()
    # The demo's job with adapter turbo (heads on the base model: no LoRA to train first), the rest of
    # the product's defaults filled in by validation.
    config = type(demo).model_validate(
        demo.model_dump(exclude_unset=True, exclude={"rank"})
        | {
            "base_model": "smollm2-135m",
            "adapter": "turbo",
            "train_steps": 1,
            "speculator_train_steps": SPECULATOR_STEPS,
            "max_eval_samples": PROMPTS,
        }
    )
    rows = demo_rows()
    rows = [row for row in rows if row["split"] == "train"][:TRAIN_ROWS] + [
        row for row in rows if row["split"] == "evaluation"
    ][:PROMPTS]
    result = train(config, rows, output_dir=tmp_path / "run", cache_dir=shared_model_cache)
    estimate = result.summary["speculator"]["estimate"]
    artifact_checks.add_to_summary(result)
    measured = result.summary["speculator"]["measured"]
    assert "error" not in measured, measured
    # Same prompts, same token budget: the engine's counters against the replay of them.
    assert (estimate["prompts"], estimate["max_new_tokens"]) == (
        measured["prompts"],
        measured["max_new_tokens"],
    )
    assert measured["prompts"] == PROMPTS
    assert measured["mean_accepted_length"] > 1.1, "the heads must have learned something to compare"
    assert estimate["mean_accepted_length"] == pytest.approx(measured["mean_accepted_length"], rel=0.10)
