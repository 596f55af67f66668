"""How `tuneforge adapters show` reads a version: the measured speedup and exact match first, then its
fields, then the held-out answers of base and adapter as a table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuneforge import AdapterVersion
from tuneforge.cli.tables import EMPTY, cell, fields, table

# Answers are model output and user data of any length: each column is cut so that a row fits a
# terminal; a prompt loses its beginning, as its end (the question) is what tells rows apart.
PROMPT_CHARS = 40
ANSWER_CHARS = 24
MAX_ANSWER_ROWS = 20
RIGHT, WRONG = "✓", "✗"
ENGINES = {"serving": "the serving engine", "training": "the training loop"}


@dataclass(frozen=True)
class Answer:
    """One held-out row as the report judged it; `base` and `base_correct` are None without a base score."""

    prompt: str
    expected: str
    base: str | None
    base_correct: bool | None
    adapter: str | None
    adapter_correct: bool | None


def adapter_details(version: AdapterVersion) -> str:
    """Headline lines, the `field  value` block, and the answers table, blank lines between."""
    summary, quality = version.metrics_summary, version.quality_report
    before, after = summary.get("eval_loss_before"), summary.get("eval_loss_after")
    block = fields(
        [
            ("adapter", version.id),
            ("status", version.status),
            ("type", version.adapter_type),
            ("base model", version.base_model),
            ("job", version.finetuning_job.uuid),
            ("error", version.finetuning_job.error),
            ("continued from", version.parent_version),
            ("steps", summary.get("steps")),
            (
                "eval loss",
                f"base {before:.4f}, adapter {after:.4f}"
                if before is not None and after is not None
                else None,
            ),
            ("quality", quality.get("summary")),
            ("speculation", speculation(summary)),
            ("speculator", speculator_phase(summary)),
            ("archived", version.archived or None),
            ("description", version.description),
            ("created", version.created_at),
        ]
    )
    headline = [line for line in (speedup_headline(summary), exact_match_headline(quality)) if line]
    parts = ["\n".join(headline), block, answers_table(answer_rows(quality), _judged_rows(quality))]
    return "\n\n".join(part for part in parts if part)


def _measured(metrics_summary: dict[str, Any]) -> dict[str, Any] | None:
    return (metrics_summary.get("speculator") or {}).get("measured") or None


def speedup_headline(metrics_summary: dict[str, Any]) -> str | None:
    """Turbo types: the decode speedup the serving engine measured and what on, or why there is none."""
    measured = _measured(metrics_summary)
    if measured is None:
        return None
    if "error" in measured:
        return f"speedup not measured: {measured['error']}"
    prompts, engine = measured["prompts"], measured.get("engine") or {}
    where = f", {engine['dtype']} on {engine['device']}" if {"dtype", "device"} <= engine.keys() else ""
    return (
        f"{measured['speedup']:.2f}x faster decoding (measured by the serving engine on {prompts} "
        f"held-out prompts, greedy, one at a time, up to {measured['max_new_tokens']} tokens each{where}; "
        f"{measured['identical_outputs']} of {prompts} outputs identical)"
    )


def speculation(metrics_summary: dict[str, Any]) -> str | None:
    """Turbo types: how the measured speedup came about (tokens/s, accepted length against the training
    estimate); None where nothing was measured."""
    speculator = metrics_summary.get("speculator") or {}
    measured, estimate = _measured(metrics_summary), speculator.get("estimated_accepted_length")
    estimated = f"training estimate {estimate:.2f}" if estimate is not None else None
    if measured is None or "error" in measured:
        return f"accepted length: {estimated}, not measured" if estimated else None
    line = (
        f"{measured['plain_tokens_per_s']:.0f} → {measured['speculative_tokens_per_s']:.0f} tokens/s, "
        f"mean accepted length {measured['mean_accepted_length']:.2f}"
    )
    return f"{line} ({estimated})" if estimated else line


def speculator_phase(metrics_summary: dict[str, Any]) -> str | None:
    """`trained N steps (why it stopped)`, with the best step where that is not the last; None without
    a recorded phase."""
    phase = (metrics_summary.get("speculator") or {}).get("phase")
    if not phase:
        return None
    why = [str(phase["stop_reason"])] if phase.get("stop_reason") else []
    best = phase.get("best_step")
    if best is not None and best != phase.get("steps"):
        why.append(f"best at step {best}")
    return f"trained {phase.get('steps')} steps" + (f" ({', '.join(why)})" if why else "")


def exact_match_headline(quality_report: dict[str, Any]) -> str | None:
    """`exact match: adapter 90% (18/20) vs base 10% (2/20), answered by ...`; None without a score."""
    scores = quality_report.get("exact_match") or {}
    base, adapter = scores.get("base"), scores.get("adapter")
    if not base and not adapter:
        return None
    parts = [f"adapter {_score(adapter)}" if adapter else "no adapter score"]
    parts.append(f"base {_score(base)}" if base else "no base-model score")
    line = "exact match: " + (" vs " if base and adapter else ", ").join(parts)
    answered = _answered_by(quality_report.get("answered_by"))
    return f"{line}, answered by {answered}" if answered else line


def _score(match: dict[str, Any]) -> str:
    return f"{match['accuracy']:.0%} ({match['correct']}/{match['rows']})"


def _answered_by(who: dict[str, Any] | None) -> str | None:
    if not who:
        return None
    engine = str(who.get("engine"))
    text = ENGINES.get(engine, engine)
    setting = " on ".join(str(who[key]) for key in ("dtype", "device") if who.get(key))
    text += f" ({setting})" if setting else ""
    return f"{text}; {who['error']}" if who.get("error") else text


def answer_rows(quality_report: dict[str, Any]) -> list[Answer]:
    """The report's held-out answers: its `answers` list, or else the base and adapter exact-match
    samples paired up (the same rows in the same order)."""
    if "answers" in quality_report:
        return [
            Answer(
                a["prompt"],
                a["expected"],
                a.get("base"),
                a.get("base_correct"),
                a.get("adapter"),
                a.get("adapter_correct"),
            )
            for a in quality_report["answers"] or []
        ]
    scores = quality_report.get("exact_match") or {}
    base = (scores.get("base") or {}).get("samples") or []
    adapter = (scores.get("adapter") or {}).get("samples") or []
    rows = []
    for i in range(max(len(base), len(adapter))):
        b = base[i] if i < len(base) else {}
        a = adapter[i] if i < len(adapter) else {}
        row = a or b
        rows.append(
            Answer(
                row["prompt"],
                row["reference"],
                b.get("prediction"),
                b.get("correct"),
                a.get("prediction"),
                a.get("correct"),
            )
        )
    return rows


def _judged_rows(quality_report: dict[str, Any]) -> int:
    scores = quality_report.get("exact_match") or {}
    return max((int(match["rows"]) for match in scores.values() if match), default=0)


def answers_table(answers: list[Answer], judged_rows: int = 0) -> str | None:
    """PROMPT, EXPECTED, BASE, ADAPTER, each answer marked right or wrong, under a line saying how many
    of the `judged_rows` held-out rows are shown; None without answers."""
    if not answers:
        return None
    shown = answers[:MAX_ANSWER_ROWS]
    rows = [
        (
            _prompt_cell(a.prompt),
            cell(a.expected, ANSWER_CHARS),
            _answer_cell(a.base, a.base_correct),
            _answer_cell(a.adapter, a.adapter_correct),
        )
        for a in shown
    ]
    total = max(judged_rows, len(answers))
    more = f" (first {len(shown)} of {total}" if total > len(shown) else ""
    more += "; --json shows all)" if len(answers) > len(shown) else (")" if more else "")
    return f"held-out answers{more}\n" + table(("prompt", "expected", "base", "adapter"), rows)


def _prompt_cell(prompt: str) -> str:
    text = cell(prompt, None)
    return text if len(text) <= PROMPT_CHARS else "…" + text[-(PROMPT_CHARS - 1) :]


def _answer_cell(answer: str | None, correct: bool | None) -> str:
    if answer is None:
        return EMPTY
    mark = "" if correct is None else (RIGHT if correct else WRONG) + " "
    # The mark leads, so cutting a long answer never cuts the verdict; "" is a real (wrong) answer.
    return mark + (cell(answer, ANSWER_CHARS - len(mark)) if answer else '""')
