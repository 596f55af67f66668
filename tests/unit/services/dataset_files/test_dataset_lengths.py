"""Row lengths for the dashboard's histogram: what a row's text is, how it is counted and binned."""

from __future__ import annotations

import json

from app.services.dataset_files.lengths import approximate_tokens, row_text, summarise


def test_row_text_takes_what_each_dataset_kind_trains_on() -> None:
    assert row_text({"prompt": "Q?", "completion": "A."}) == "Q?\nA."
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert row_text({"messages": messages}) == "hi\nyo"
    assert row_text({"messages": json.dumps(messages)}) == "hi\nyo"  # CSV cells hold JSON strings
    assert row_text({"text": "plain"}) == "plain"


def test_words_and_punctuation_are_counted_as_pieces() -> None:
    assert approximate_tokens("Hello, world!") == 4
    assert approximate_tokens("") == 0


def test_summary_bins_cover_every_row_and_the_longest_lands_in_the_last_bin() -> None:
    lengths = [0, 1, 5, 5, 11, 120]
    summary = summarise(lengths, bins=12)
    assert (summary.rows, summary.min, summary.max) == (6, 0, 120)
    assert sum(b.count for b in summary.bins) == 6
    assert summary.bins[0].start == 0 and summary.bins[0].end == 11
    assert summary.bins[-1].start <= 120 < summary.bins[-1].end and summary.bins[-1].count == 1
    assert summary.p50 == 5 and summary.p95 == 120


def test_an_empty_list_summarises_to_no_bins() -> None:
    assert summarise([]).bins == [] and summarise([]).rows == 0


def test_row_text_of_the_task_kinds_takes_what_their_rows_train_on() -> None:
    # A preference pair trains two sequences; the longer one sets the length that matters.
    assert row_text({"prompt": "Q?", "chosen": "yes", "rejected": "no, never"}) == "Q?\nno, never"
    turns = [{"role": "user", "content": "hi"}]
    answer = [{"role": "assistant", "content": "hello there"}]
    assert row_text({"messages": turns, "chosen": answer, "rejected": "hey"}) == "hi\nhello there"
    openai = {"input": {"messages": turns}, "preferred_output": answer, "non_preferred_output": []}
    assert row_text(openai) == "hi\nhello there"
    as_csv = {key: json.dumps(value) for key, value in openai.items()}
    assert row_text(as_csv, "preference") == "hi\nhello there"
    assert row_text({"text": "great film", "label": 1}) == "great film"
    assert row_text({"prompt": "2+2?", "answer": 4}) == "2+2?"
    # The dataset's kind decides, not a row of a JSONL file that lacks some of its columns.
    assert row_text({"prompt": "Q?"}, "prompt_completion") == "Q?\n"
