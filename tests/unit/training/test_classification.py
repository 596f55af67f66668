"""Task 'classification': a LoRA plus a `score` head learns a separable label, is judged by accuracy and F1,
and is published as a PEFT SEQ_CLS adapter with its label set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from training_support import Recorder, crash_and_resume, make_config
from tuneforge import lora_rules
from tuneforge.rules.artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CLASSIFIER_LABELS
from tuneforge.rules.classifier import parse_labels

from app.services.adapter_files import checks as adapter_checks
from worker.artifact_checks import add_to_summary
from worker.training.classification import scores
from worker.training.data import TrainingDataError
from worker.training.loop import TrainingResult, train

WORDS = ["apple", "river", "stone", "cloud", "paper", "glass", "tiger", "music"]


def good_rows(n: int = 48) -> list[dict[str, Any]]:
    """label = whether the text holds 'good' (last word, where the pooled token sits): trivially separable."""
    rows = []
    for i in range(n):
        words = f"{WORDS[i % 8]} {WORDS[(i * 3) % 8]}"
        good = i % 2 == 0
        rows.append({"text": f"{words} good" if good else f"{words} bad", "label": "yes" if good else "no"})
    return rows


def cls_config(**overrides: Any) -> Any:
    return make_config(
        **(
            {
                "task": "classification",
                "train_steps": 30,
                "learning_rate": 3e-2,
                "eval_fraction": 0.25,
                "eval_every_n_steps": 30,
            }
            | overrides
        )
    )


@pytest.fixture(scope="module")
def trained(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainingResult, Recorder]:
    recorder = Recorder()
    result = train(
        cls_config(), good_rows(), output_dir=tmp_path_factory.mktemp("cls"), cache_dir=tiny_cache,
        callbacks=recorder,
    )  # fmt: skip
    return result, recorder


def test_a_separable_label_is_learned(trained: tuple[TrainingResult, Recorder]) -> None:
    result, recorder = trained
    report = result.summary["quality_report"]
    assert report["task"] == "classification"
    assert report["accuracy"]["after"] >= 0.9
    assert report["accuracy"]["after"] > report["accuracy"]["before"]
    assert result.eval_loss_after is not None and result.eval_loss_before is not None
    assert result.eval_loss_after < result.eval_loss_before
    accuracies = [metrics["train_accuracy"] for _, metrics in recorder.steps]
    assert sum(accuracies[-5:]) / 5 > sum(accuracies[:5]) / 5


def test_quality_report_has_per_label_scores_and_confusion(trained: tuple[TrainingResult, Recorder]) -> None:
    report = trained[0].summary["quality_report"]
    assert set(report["per_label"]) == {"no", "yes"}
    assert set(report["per_label"]["yes"]) == {"precision", "recall", "f1", "support"}
    matrix = report["confusion_matrix"]
    assert matrix["labels"] == ["no", "yes"]
    assert sum(map(sum, matrix["matrix"])) == report["rows"] == 12
    assert set(report["f1_macro"]) == {"before", "after"}


def test_eval_metrics_keys(tiny_cache: Path, tmp_path: Path) -> None:
    class Evals(Recorder):
        metrics: list[dict[str, float]] = []

        def on_eval(self, step: int, metrics: dict[str, float]) -> None:
            self.metrics.append(metrics)

    recorder = Evals()
    train(
        cls_config(train_steps=2, eval_every_n_steps=2), good_rows(16), output_dir=tmp_path,
        cache_dir=tiny_cache, callbacks=recorder,
    )  # fmt: skip
    assert set(recorder.metrics[-1]) == {"eval_loss", "eval_accuracy", "eval_f1"}
    assert 0.0 <= recorder.metrics[-1]["eval_accuracy"] <= 1.0


def test_artifact_is_a_seq_cls_adapter_with_its_labels(trained: tuple[TrainingResult, Recorder]) -> None:
    adapter = trained[0].adapter_dir
    assert adapter is not None
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    assert parse_labels((adapter / CLASSIFIER_LABELS).read_bytes()) == ["no", "yes"]
    with safe_open(str(adapter / ADAPTER_WEIGHTS), "pt") as weights:
        tensors = {name: (weights.get_slice(name).get_dtype(), weights.get_slice(name).get_shape())
                   for name in weights.keys()}  # noqa: SIM118  # fmt: skip
    assert tensors["base_model.model.score.weight"][1] == [2, 64]
    # The rules both planes check uploads and loads with accept it (tiny-random-llama: hidden size 64).
    model_config = json.loads((trained[0].model_dir / "config.json").read_text())
    lora_rules.check_config(config)
    lora_rules.check_tensors(tensors, config, model_config=model_config)
    # The control plane's upload checks (the same rules) accept the files as stored.
    weights = (adapter / ADAPTER_WEIGHTS).read_bytes()
    parsed = adapter_checks.parse_config((adapter / ADAPTER_CONFIG).read_bytes(), max_rank=64)
    adapter_checks.check_weights([weights], len(weights), parsed, model_config=model_config, max_rank=64)
    # No held-out answers for serving to replay (they are next-token prompts): the worker's serving checks
    # of the artifact leave its report as training wrote it.
    assert trained[0].held_out_answers == [] and trained[0].held_out_prompts == []
    report = json.loads(json.dumps(trained[0].summary["quality_report"]))
    add_to_summary(trained[0])
    assert trained[0].summary["quality_report"] == report


def test_a_half_precision_base_trains_the_head_in_fp32(tiny_cache: Path, tmp_path: Path) -> None:
    result = train(
        cls_config(train_steps=2, dtype="bf16"), good_rows(16), output_dir=tmp_path, cache_dir=tiny_cache
    )
    assert result.adapter_dir is not None
    with safe_open(str(result.adapter_dir / ADAPTER_WEIGHTS), "pt") as weights:
        assert weights.get_slice("base_model.model.score.weight").get_dtype() == "F32"


def test_integer_labels_are_their_decimal_strings(tiny_cache: Path, tmp_path: Path) -> None:
    rows = [{"text": r["text"], "label": 1 if r["label"] == "yes" else 10} for r in good_rows(12)]
    result = train(cls_config(train_steps=1), rows, output_dir=tmp_path, cache_dir=tiny_cache)
    assert result.adapter_dir is not None
    assert parse_labels((result.adapter_dir / CLASSIFIER_LABELS).read_bytes()) == ["1", "10"]


def test_eval_label_unseen_in_train_names_the_row(tiny_cache: Path, tmp_path: Path) -> None:
    rows = [dict(r, split="train") for r in good_rows(8)]
    rows.append({"text": "odd one", "label": "maybe", "split": "evaluation"})
    with pytest.raises(TrainingDataError, match=r"row 9: label 'maybe' is in no training row"):
        train(cls_config(train_steps=1), rows, output_dir=tmp_path, cache_dir=tiny_cache)


def test_one_label_or_a_bad_label_is_refused(tiny_cache: Path, tmp_path: Path) -> None:
    same = [{"text": f"t {i}", "label": "a"} for i in range(6)]
    with pytest.raises(TrainingDataError, match="1 distinct labels"):
        train(cls_config(train_steps=1), same, output_dir=tmp_path, cache_dir=tiny_cache)
    bad = [{"text": f"t {i}", "label": [i]} for i in range(6)]
    with pytest.raises(TrainingDataError, match=r"row \d+: label is"):
        train(cls_config(train_steps=1), bad, output_dir=tmp_path, cache_dir=tiny_cache)


def test_scores_match_hand_counts() -> None:
    # truth:   0 0 1 1 2 ; predicted: 0 1 1 1 0
    result = scores([0, 1, 1, 1, 0], [0, 0, 1, 1, 2], 3)
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert result["per_label"][1] == {
        "precision": 2 / 3,
        "recall": 1.0,
        "f1": pytest.approx(0.8),
        "support": 2,
    }
    assert result["f1_macro"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_a_crashed_run_resumes_exactly(tiny_cache: Path, tmp_path: Path) -> None:
    """The head and the LoRA come back from the checkpoint: resumed steps' losses are the straight run's."""
    config = cls_config(train_steps=4, checkpoint_every_n_steps=2, eval_every_n_steps=4)
    run = crash_and_resume(config, good_rows(16), tmp_path, tiny_cache, at=2)
    torch.testing.assert_close(run.resumed.losses(), run.straight.losses()[2:], rtol=1e-5, atol=1e-6)
    assert run.result.adapter_dir is not None
    assert parse_labels((run.result.adapter_dir / CLASSIFIER_LABELS).read_bytes()) == ["no", "yes"]
