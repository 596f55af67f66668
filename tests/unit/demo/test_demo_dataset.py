"""Tests for the quickstart's demo dataset: deterministic, valid for upload, exactly scorable."""

from __future__ import annotations

import csv
import json
import re
from datetime import date
from pathlib import Path

import pytest

from app.demo.dataset import (
    MONTHS,
    demo_rows,
    exact_match,
    ordinal_suffix,
    ordinal_word,
    write_demo_dataset,
)
from app.services.dataset_files.formats import profile_dataset


def read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("file_format", ["jsonl", "csv"])
def test_same_seed_writes_identical_bytes(tmp_path: Path, file_format: str) -> None:
    first = write_demo_dataset(tmp_path / f"a.{file_format}", file_format=file_format)  # type: ignore[arg-type]
    second = write_demo_dataset(tmp_path / f"b.{file_format}", file_format=file_format)  # type: ignore[arg-type]
    assert first.read_bytes() == second.read_bytes()


def test_different_seeds_give_different_rows() -> None:
    assert demo_rows(50, seed=0) != demo_rows(50, seed=1)


@pytest.mark.parametrize("file_format", ["jsonl", "csv"])
def test_written_dataset_passes_validation_with_a_90_10_split(tmp_path: Path, file_format: str) -> None:
    path = write_demo_dataset(tmp_path / f"demo.{file_format}", file_format=file_format)  # type: ignore[arg-type]
    profile = profile_dataset([path.read_bytes()], path.name)
    assert profile.file_format == file_format
    assert profile.format == "prompt_completion"
    assert profile.row_count == 600
    assert profile.columns == ["prompt", "completion", "split"]
    assert profile.split_counts == {"train": 540, "evaluation": 60}


def test_csv_and_jsonl_hold_the_same_rows(tmp_path: Path) -> None:
    rows = read_jsonl(write_demo_dataset(tmp_path / "d.jsonl", rows=100, seed=3))
    with write_demo_dataset(tmp_path / "d.csv", rows=100, seed=3, file_format="csv").open(newline="") as f:
        assert list(csv.DictReader(f)) == rows


def date_in_words(phrase: str) -> date:
    """An independent reading of a demo phrase, so the test does not reuse the generator's logic."""
    words = {ordinal_word(day): day for day in range(1, 32)}
    year = int(re.search(r"\b(\d{4})\b", phrase).group(1))  # type: ignore[union-attr]
    month = next(index for index, name in enumerate(MONTHS, start=1) if name in phrase)
    spelled = re.search(r"\bthe ([a-z-]+)\b", phrase)
    numbered = re.search(r"\b(\d{1,2})(?:st|nd|rd|th)?\b", phrase)
    day = words[spelled.group(1)] if spelled else int(numbered.group(1))  # type: ignore[union-attr]
    return date(year, month, day)


def test_every_completion_is_the_iso_form_of_the_date_in_its_prompt() -> None:
    for row in demo_rows():
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["completion"])
        phrase = row["prompt"].split("Date: ")[1].splitlines()[0]
        assert date_in_words(phrase).isoformat() == row["completion"], phrase


def test_prompts_vary_in_phrasing_and_end_where_the_answer_begins() -> None:
    rows = demo_rows()
    phrases = {row["prompt"].split("Date: ")[1].split(" ")[0] for row in rows}
    assert {"the", "Monday,", "January"} <= phrases  # several surface forms, not one template
    assert all(row["prompt"].endswith("ISO date:\n") for row in rows)


def test_evaluation_dates_never_appear_in_training() -> None:
    rows = demo_rows()
    train = {row["completion"] for row in rows if row["split"] == "train"}
    evaluation = {row["completion"] for row in rows if row["split"] == "evaluation"}
    assert len(evaluation) == 60
    assert not train & evaluation


def test_exact_match_scores_the_whole_answer_as_the_quality_report_does() -> None:
    assert exact_match(" 2021-03-03\n", "2021-03-03")
    assert not exact_match(" 2021-03-03\nDate: something else", "2021-03-03")
    assert not exact_match("2021-3-3", "2021-03-03")
    assert not exact_match("March 3rd, 2021", "2021-03-03")
    assert not exact_match("", "2021-03-03")


@pytest.mark.parametrize(
    ("day", "expected"),
    [
        (1, "1st"),
        (2, "2nd"),
        (3, "3rd"),
        (11, "11th"),
        (12, "12th"),
        (13, "13th"),
        (21, "21st"),
        (22, "22nd"),
        (31, "31st"),
    ],
)
def test_ordinal_suffix(day: int, expected: str) -> None:
    assert ordinal_suffix(day) == expected


def test_ordinal_words_cover_every_day_of_a_month() -> None:
    assert (ordinal_word(1), ordinal_word(23), ordinal_word(31)) == ("first", "twenty-third", "thirty-first")


def test_invalid_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rows must be between"):
        demo_rows(5)
    with pytest.raises(ValueError, match="file_format must be"):
        write_demo_dataset(tmp_path / "d.txt", file_format="txt")  # type: ignore[arg-type]
