"""Owns task 'classification': a LoRA on the base plus a classification head (`score`, [labels, hidden]) on
the hidden state of each text's last real token, trained with cross-entropy; judged by accuracy, macro F1,
per-label precision / recall and a confusion matrix.

The label set is the sorted distinct labels of the train split (integers as their decimal string), saved in
the artifact as classifier_labels.json (tuneforge.rules.classifier) beside the PEFT SEQ_CLS adapter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tuneforge.rules.classifier import MAX_LABELS, label_name
from tuneforge.rules.datasets import LABEL_COLUMN, TEXT_COLUMN

from worker.training.config import TrainingConfig
from worker.training.data import DataStats, PreparedData, TrainingDataError, detect_kind, split_rows

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from worker.training.preparation import Run

REPORT_FORMAT = 1
CLASSIFIER_HEAD = "score"  # the head's module name in HF's *ForSequenceClassification models


@dataclass(frozen=True)
class LabelledText:
    input_ids: list[int]
    label: int  # index into the run's label set


@dataclass(frozen=True)
class LabelBatch:
    """Right-padded texts and their classes."""

    input_ids: torch.Tensor  # [B, S]
    attention_mask: torch.Tensor  # [B, S]
    labels: torch.Tensor  # [B]

    @property
    def target_count(self) -> int:
        return int(self.labels.numel())

    @property
    def useful_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def token_count(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device) -> LabelBatch:
        return LabelBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def make_label_batch(examples: Sequence[LabelledText], pad_token_id: int) -> LabelBatch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, : len(example.input_ids)] = torch.tensor(example.input_ids)
        mask[row, : len(example.input_ids)] = 1
    return LabelBatch(ids, mask, torch.tensor([e.label for e in examples], dtype=torch.long))


def pooled_logits(classifier: PreTrainedModel, batch: LabelBatch) -> torch.Tensor:
    """[B, labels] fp32 logits of the head on each row's last real token (as LlamaForSequenceClassification
    pools, found by the attention mask rather than by the pad id, which may be a real token too)."""
    decoder = getattr(classifier, classifier.base_model_prefix)
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    last = batch.attention_mask.sum(dim=1) - 1  # [B]
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, H]
    head = classifier.score
    return head(pooled.to(_head_dtype(head))).float()


def _head_dtype(head: torch.nn.Module) -> torch.dtype:
    return next(head.parameters()).dtype


def _label(index: int, row: Mapping[str, Any]) -> str:
    name = label_name(row.get(LABEL_COLUMN))
    if name is None:
        raise TrainingDataError(
            f"row {index + 1}: label is {str(row.get(LABEL_COLUMN))[:80]!r}; a label is a non-empty string "
            "(at most 256 characters) or an integer"
        )
    return name


class ClassificationTask:
    """A label per text: cross-entropy of the head's logits; accuracy and F1 on the held-out rows."""

    def __init__(self) -> None:
        self.labels: list[str] = []  # class index -> label; decided by `prepare` from the train split
        self._correct, self._seen = 0, 0

    def prepare(
        self, rows: Sequence[Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, config: TrainingConfig
    ) -> PreparedData:
        if not rows:
            raise TrainingDataError("the dataset has no rows")
        if detect_kind(rows[0]) != "classification":
            raise TrainingDataError(
                f"task 'classification' trains on rows of '{TEXT_COLUMN}' + '{LABEL_COLUMN}'; "
                f"the rows have columns {sorted(rows[0])[:20]}"
            )
        train_rows, eval_rows = split_rows(rows, config)
        self.labels = sorted({_label(number, row) for number, row in train_rows})
        if not 2 <= len(self.labels) <= MAX_LABELS:
            raise TrainingDataError(
                f"label: the train split has {len(self.labels)} distinct labels; classification needs "
                f"2..{MAX_LABELS}"
            )
        index = {label: i for i, label in enumerate(self.labels)}
        assert config.max_seq_length is not None  # resolved before the task prepares
        truncated: list[int] = []

        def encode(part: list[tuple[int, Mapping[str, Any]]]) -> list[LabelledText]:
            examples = []
            for number, row in part:
                label = _label(number, row)
                if label not in index:
                    raise TrainingDataError(
                        f"row {number + 1}: label {label[:80]!r} is in no training row, so the classifier "
                        "cannot learn it; add training rows with it or drop the row"
                    )
                ids = tokenizer(str(row.get(TEXT_COLUMN) or ""))["input_ids"]
                if len(ids) > config.max_seq_length:
                    truncated.append(number + 1)
                    ids = ids[: config.max_seq_length]
                if not ids:
                    raise TrainingDataError(
                        f"row {number + 1}: text is empty and the tokenizer adds no token"
                    )
                examples.append(LabelledText(ids, index[label]))
            return examples

        train, held_out = encode(train_rows), encode(eval_rows)
        stats = DataStats(
            kind="classification",
            train_rows=len(train),
            eval_rows=len(held_out),
            truncated_rows=len(truncated),
            truncated_row_numbers=tuple(sorted(truncated)),
            max_seq_length=config.max_seq_length,
            rows_without_targets=0,
            train_tokens=sum(len(e.input_ids) for e in train),
        )
        return PreparedData(train, held_out, stats, labels=tuple(self.labels))  # type: ignore[arg-type]

    def step_batches(self, run: Run, micro_batches: Sequence[Sequence[Any]], step: int) -> list[LabelBatch]:
        return [make_label_batch(micro, run.pad_token_id) for micro in micro_batches]

    def loss_sum(self, run: Run, batch: LabelBatch) -> torch.Tensor:  # type: ignore[override]
        batch = batch.to(run.device)
        logits = pooled_logits(run.trainable.causal_lm(), batch)
        with torch.no_grad():
            self._correct += int((logits.argmax(-1) == batch.labels).sum())
            self._seen += batch.target_count
        return torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum")

    def step_metrics(self) -> dict[str, float]:
        metrics = {"train_accuracy": self._correct / self._seen} if self._seen else {}
        self._correct, self._seen = 0, 0
        return metrics

    def evaluate(self, run: Run) -> dict[str, float] | None:
        judged = self._judge(run)
        if judged is None:
            return None
        loss, predictions, truth = judged
        report = scores(predictions, truth, len(self.labels))
        return {"eval_loss": loss, "eval_accuracy": report["accuracy"], "eval_f1": report["f1_macro"]}

    def baseline(self, run: Run) -> dict[str, Any] | None:
        return self.evaluate(run)

    def restore(self, run: Run, baseline: dict[str, Any] | None) -> None:
        pass  # its baseline is only compared against, by the quality report

    def quality_report(
        self, run: Run, baseline: dict[str, Any] | None, after: dict[str, float] | None
    ) -> dict[str, Any]:
        judged = self._judge(run)
        before = baseline or {}
        if judged is None:
            return {"task": "classification", "format": REPORT_FORMAT, "summary": "no held-out rows to judge"}
        loss, predictions, truth = judged
        report = scores(predictions, truth, len(self.labels))
        accuracy = {"before": before.get("eval_accuracy"), "after": report["accuracy"]}
        return {
            "task": "classification",
            "format": REPORT_FORMAT,
            "summary": _summary(accuracy, len(truth)),
            "rows": len(truth),
            "accuracy": accuracy,
            "f1_macro": {"before": before.get("eval_f1"), "after": report["f1_macro"]},
            "eval_loss": {"base": before.get("eval_loss"), "adapter": loss},
            "per_label": {self.labels[i]: values for i, values in enumerate(report["per_label"])},
            "confusion_matrix": {"labels": list(self.labels), "matrix": report["matrix"]},
        }

    @torch.no_grad()
    def _judge(self, run: Run) -> tuple[float, list[int], list[int]] | None:
        """(mean cross-entropy, predicted class, true class) over the eval split; None without eval rows."""
        examples: list[LabelledText] = run.data.eval  # type: ignore[assignment]
        if not examples:
            return None
        model = run.trainable.model
        was_training = model.training
        model.eval()
        size = run.config.eval_micro_batch_size
        total, predictions = 0.0, []
        try:
            for start in range(0, len(examples), size):
                batch = make_label_batch(examples[start : start + size], run.pad_token_id).to(run.device)
                logits = pooled_logits(run.trainable.causal_lm(), batch)
                total += float(torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum"))
                predictions += logits.argmax(-1).tolist()
        finally:
            model.train(was_training)
        return total / len(examples), predictions, [e.label for e in examples]


def scores(predictions: Sequence[int], truth: Sequence[int], n_labels: int) -> dict[str, Any]:
    """Accuracy, macro F1 (over the labels that occur in truth or predictions), per-label precision /
    recall / F1 / support, and the confusion matrix (rows: true label, columns: predicted)."""
    matrix = [[0] * n_labels for _ in range(n_labels)]
    for predicted, true in zip(predictions, truth, strict=True):
        matrix[true][predicted] += 1
    per_label, f1s = [], []
    for label in range(n_labels):
        hits = matrix[label][label]
        support = sum(matrix[label])
        predicted = sum(row[label] for row in matrix)
        precision = hits / predicted if predicted else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label.append({"precision": precision, "recall": recall, "f1": f1, "support": support})
        if support or predicted:  # as scikit-learn's macro F1 over the labels present
            f1s.append(f1)
    correct = sum(matrix[i][i] for i in range(n_labels))
    return {
        "accuracy": correct / len(truth) if truth else 0.0,
        "f1_macro": sum(f1s) / len(f1s) if f1s else 0.0,
        "per_label": per_label,
        "matrix": matrix,
    }


def _summary(accuracy: dict[str, float | None], rows: int) -> str:
    before, after = accuracy["before"], accuracy["after"]
    if before is None or after is None:
        return f"accuracy {after:.1%} on {rows} held-out rows"
    return f"accuracy {before:.1%} -> {after:.1%} on {rows} held-out rows"
