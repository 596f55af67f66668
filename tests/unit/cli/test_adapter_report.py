"""`tuneforge adapters show`: the measured speedup and exact match lead, the answers are a table."""

from __future__ import annotations

import io
import json
from typing import Any

from tuneforge import AdapterVersion
from tuneforge.cli.adapter_report import (
    ANSWER_CHARS,
    MAX_ANSWER_ROWS,
    PROMPT_CHARS,
    adapter_details,
    answer_rows,
    speculation,
    speculator_phase,
)
from tuneforge.cli.tables import emit

MEASURED = {"prompts": 8, "max_new_tokens": 32, "plain_tokens_per_s": 40.2,
            "speculative_tokens_per_s": 81.0, "speedup": 2.015, "mean_accepted_length": 2.6,
            "engine": {"dtype": "fp32", "device": "cpu", "batch_size": 1, "temperature": 0.0},
            "acceptance_rate": 0.53, "identical_outputs": 8}  # fmt: skip


def _match(correct: list[bool], predictions: list[str]) -> dict[str, Any]:
    samples = [
        {"prompt": f"Q{i}: what is {i}?", "reference": str(i), "prediction": p, "correct": c}
        for i, (p, c) in enumerate(zip(predictions, correct, strict=True))
    ]
    return {"rows": 20, "correct": sum(correct) * 4, "accuracy": sum(correct) * 4 / 20, "samples": samples}


def _version(summary: dict[str, Any], quality: dict[str, Any]) -> AdapterVersion:
    return AdapterVersion(uuid="u", repo="numbers", tag=2, status="completed", adapter_type="turbo_lora",
                          metrics_summary=summary, quality_report=quality)  # fmt: skip


SAMPLES_ONLY = {
    "exact_match": {
        "base": _match([False, True, False, False, False], ["x", "1", "y", "z", "w"]),
        "adapter": _match([True, True, True, True, False], ["0", "1", "2", "3", "five"]),
    },
    "summary": "exact match: base 20% → adapter 80% on 20 held-out rows; eval loss 2.00 → 0.50",
}


def test_the_speedup_and_exact_match_lead_then_the_fields_then_the_answers() -> None:
    phase = {"steps": 300, "stop_reason": "plateau", "best_step": 250, "history": [[250, 2.7]]}
    speculator = {"measured": MEASURED, "estimated_accepted_length": 2.75, "phase": phase}
    quality = SAMPLES_ONLY | {
        "answered_by": {"engine": "serving", "dtype": "float32", "device": "cpu", "rows": 20}
    }
    out = adapter_details(_version({"speculator": speculator, "steps": 40}, quality)).splitlines()
    assert out[0] == (
        "2.02x faster decoding (measured by the serving engine on 8 held-out prompts, greedy, one at a "
        "time, up to 32 tokens each, fp32 on cpu; 8 of 8 outputs identical)"
    )
    assert out[1] == (
        "exact match: adapter 80% (16/20) vs base 20% (4/20), answered by the serving engine (float32 on cpu)"
    )
    assert out[2] == "" and out[3].startswith("adapter ") and out[3].endswith("numbers/2")
    [spec] = [line for line in out if line.startswith("speculation")]
    assert spec.endswith("40 → 81 tokens/s, mean accepted length 2.60 (training estimate 2.75)")
    [trained] = [line for line in out if line.startswith("speculator ")]
    assert trained.endswith("trained 300 steps (plateau, best at step 250)")
    table = out[out.index("held-out answers (first 5 of 20)") + 1 :]  # the samples of 20 rows judged
    assert table[0].split() == ["PROMPT", "EXPECTED", "BASE", "ADAPTER"]
    assert table[1].split() == ["Q0:", "what", "is", "0?", "0", "✗", "x", "✓", "0"]
    assert table[5].split()[-4:] == ["✗", "w", "✗", "five"]  # the fifth row: both wrong
    assert len(table) == 6


def test_the_answers_list_is_preferred_and_long_or_hostile_text_stays_on_one_short_line() -> None:
    question = "Convert this date.\n" + "lorem ipsum " * 40 + "What is the twentieth of April, 2011?"
    answers = [
        {"prompt": question, "expected": "2011-04-20", "base": "June\n" * 50, "adapter": "2011-04-20",
         "base_correct": False, "adapter_correct": True},
        {"prompt": "p", "expected": "q", "base": None, "adapter": "", "base_correct": None,
         "adapter_correct": False},
    ]  # fmt: skip
    quality = SAMPLES_ONLY | {"answers": answers}
    out = adapter_details(_version({}, quality)).splitlines()
    table = out[out.index("held-out answers (first 2 of 20)") + 1 :]
    assert len(table) == 3  # the answers list, not the five paired samples
    first = table[1]
    assert first.startswith("…") and "April, 2011?" in first  # the question's end is kept
    assert first.index("2011-04-20") <= PROMPT_CHARS + 2
    assert "✗ June June" in first and first.endswith("✓ 2011-04-20")
    assert len(first) < PROMPT_CHARS + 3 * ANSWER_CHARS + 3 * 2
    assert table[2].split() == ["p", "q", "-", "✗", '""']  # no base score; an empty answer is shown
    assert not any(line.startswith("2.02x") for line in out)  # not a turbo version: no speedup line


def test_a_long_answers_list_shows_its_first_rows_and_says_where_the_rest_are() -> None:
    answers = [{"prompt": f"p{i}", "expected": "e", "base": "b", "adapter": "a", "base_correct": False,
                "adapter_correct": False} for i in range(MAX_ANSWER_ROWS + 5)]  # fmt: skip
    out = adapter_details(_version({}, {"answers": answers})).splitlines()
    table = out[
        out.index(f"held-out answers (first {MAX_ANSWER_ROWS} of {MAX_ANSWER_ROWS + 5}; --json shows all)")
        + 1 :
    ]
    assert len(table) == MAX_ANSWER_ROWS + 1 and table[-1].startswith(f"p{MAX_ANSWER_ROWS - 1} ")


def test_without_answers_the_samples_of_base_and_adapter_are_paired_row_by_row() -> None:
    rows = answer_rows(SAMPLES_ONLY)
    assert [(r.expected, r.base, r.base_correct, r.adapter, r.adapter_correct) for r in rows[:2]] == [
        ("0", "x", False, "0", True),
        ("1", "1", True, "1", True),
    ]
    only_adapter = {"exact_match": {"base": None, "adapter": SAMPLES_ONLY["exact_match"]["adapter"]}}
    assert [r.base for r in answer_rows(only_adapter)] == [None] * 5
    out = adapter_details(_version({}, only_adapter))
    assert out.startswith("exact match: adapter 80% (16/20), no base-model score\n")
    assert answer_rows({}) == [] and "held-out answers" not in adapter_details(_version({}, {}))


def test_a_failed_or_missing_measurement_says_so_and_a_missing_phase_is_left_out() -> None:
    failed = {"speculator": {"measured": {"error": "ValueError: the engine runs llama models"}}}
    assert adapter_details(_version(failed, {})).splitlines()[0] == (
        "speedup not measured: ValueError: the engine runs llama models"
    )
    assert speculation(failed) is None and speculator_phase(failed) is None
    estimated = {"speculator": {"estimated_accepted_length": 3.49}}
    assert speculation(estimated) == "accepted length: training estimate 3.49, not measured"
    assert speculation({"speculator": None}) is None and speculation({}) is None  # not a turbo version
    unfinished = {"speculator": {"phase": {"steps": 12, "stop_reason": "canceled", "best_step": 12}}}
    assert speculator_phase(unfinished) == "trained 12 steps (canceled)"


def test_json_output_is_the_version_as_the_client_reads_it() -> None:
    version = _version({"speculator": {"measured": MEASURED}}, SAMPLES_ONLY)
    out = io.StringIO()
    emit(True, version, lambda: adapter_details(version), out)
    printed = json.loads(out.getvalue())
    assert printed == version.model_dump(mode="json")
    assert printed["quality_report"] == SAMPLES_ONLY
