"""Owns the version's quality report as the deployment answers it: the serving engine answers each held-out
row greedily with the base model and with the artifact, and the texts are judged as training judges them.

Training scores exact match itself (worker/training/quality.py) with HF-style batched greedy decoding in
the run's dtype; that stays the fallback, and is what the report keeps (saying so in `answered_by`) when
the engine cannot answer. The two can differ: a run on a CPU or GPU with native bf16 computes the frozen
base in bf16, while deployments compute in fp32, and near-tied greedy tokens flip between the two.

Cost, bounded: two requests per held-out row (at most max_eval_samples rows), one at a time, each at most
quality.answer_tokens(reference) <= quality.MAX_NEW_TOKENS tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from worker.artifact_checks.served_engine import ServedArtifact, generate
from worker.training import quality
from worker.training.quality import ExactMatch, Sample

ANSWER_ROWS = 20  # rows of answers the report lists; exact match counts every held-out row
Rows = Sequence[tuple[list[int], list[int]]]  # (prompt ids, reference ids) per held-out row


@dataclass(frozen=True)
class Answers:
    """The engine's output tokens for each row, as a client receives them (EOS included, if it ended so)."""

    base: list[list[int]]
    adapter: list[list[int]]


def max_len(rows: Rows) -> int:
    """The longest request the rows make: a prompt and its answer budget."""
    return max((len(prompt) + quality.answer_tokens(target) for prompt, target in rows), default=0)


def ask(served: ServedArtifact, rows: Rows, adapter_id: str | None) -> list[list[int]]:
    """Each row's greedy answer from `adapter_id` (None: the engine's model), one request at a time."""
    return [
        [
            output.token_id
            for output in generate(served.engine, prompt, adapter_id, quality.answer_tokens(target))
        ]
        for prompt, target in rows
    ]


def report(
    served: ServedArtifact, rows: Rows, answers: Answers, eval_loss: dict[str, float | None]
) -> dict[str, Any]:
    """The quality report of these answers: training's shape, plus the answers and who gave them."""
    tokenizer = served.engine.tokenizer
    # The reference is cut where training cut it (EOS, the chat template's end of turn) and where the
    # engine stops; the answer is judged whole, as the deployment returns it.
    stops = sorted(set(quality.stop_ids(None, tokenizer)) | served.engine.runner.eos_token_ids)
    base = [quality.judge(tokenizer, p, t, a, stops) for (p, t), a in zip(rows, answers.base, strict=True)]
    tuned = [
        quality.judge(tokenizer, p, t, a, stops) for (p, t), a in zip(rows, answers.adapter, strict=True)
    ]
    result = quality.quality_report(
        _exact_match(base),
        _exact_match(tuned),
        eval_loss_base=eval_loss.get("base"),
        eval_loss_adapter=eval_loss.get("adapter"),
    )
    result["answers"] = answer_rows(base, tuned)
    result["answered_by"] = {
        "engine": "serving",
        "dtype": served.dtype,
        "device": served.device,
        "rows": len(rows),
    }
    return result


def training_report(trained: dict[str, Any], runtime: dict[str, Any], error: str | None) -> dict[str, Any]:
    """Training's own report, kept where the engine could not answer, with the answers it sampled."""
    match = trained.get("exact_match") or {}
    base, tuned = (
        [Sample(**sample) for sample in (match.get(side) or {}).get("samples", ())]
        for side in ("base", "adapter")
    )
    rows = int((match.get("adapter") or match.get("base") or {}).get("rows", 0))
    answered_by: dict[str, Any] = {
        "engine": "training",
        "dtype": runtime.get("dtype"),
        "device": runtime.get("device"),
        "rows": rows,
    }
    if error is not None:
        answered_by["error"] = error
    return trained | {"answers": answer_rows(base or None, tuned), "answered_by": answered_by}


def answer_rows(base: list[Sample] | None, adapter: list[Sample]) -> list[dict[str, Any]]:
    """The report's table, in held-out order: at most ANSWER_ROWS rows (base None: no base-model answers)."""
    rows = []
    for index, tuned in enumerate(adapter[:ANSWER_ROWS]):
        plain = base[index] if base is not None and index < len(base) else None
        rows.append(
            {
                "prompt": tuned.prompt,
                "expected": tuned.reference,
                "base": plain.prediction if plain else None,
                "adapter": tuned.prediction,
                "base_correct": plain.correct if plain else None,
                "adapter_correct": tuned.correct,
            }
        )
    return rows


def _exact_match(samples: list[Sample]) -> ExactMatch:
    correct = sum(sample.correct for sample in samples)
    return ExactMatch(len(samples), correct, correct / len(samples), tuple(samples[: quality.MAX_SAMPLES]))
