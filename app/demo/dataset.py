"""Generates the quickstart's demo dataset: dates written in words, to be rewritten as YYYY-MM-DD.

The task suits a CPU demo: SmolLM2-135M-Instruct gets it mostly wrong zero-shot (it must map
month names and ordinal words to zero-padded numbers), a few hundred LoRA steps teach it, and
every answer is checkable by exact match.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path
from typing import Literal

from tuneforge.rules.datasets import SPLIT_COLUMN, Split

# Spelled out here rather than taken from `calendar`, whose names follow the process locale.
MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_ORDINAL_WORDS = (
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
    "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
    "eighteenth", "nineteenth", "twentieth", "twenty-first", "twenty-second", "twenty-third",
    "twenty-fourth", "twenty-fifth", "twenty-sixth", "twenty-seventh", "twenty-eighth",
    "twenty-ninth", "thirtieth", "thirty-first",
)  # fmt: skip

PROMPT_TEMPLATE = "Rewrite the date in ISO 8601 format (YYYY-MM-DD).\nDate: {phrase}\nISO date:\n"
FIRST_DAY = date(1900, 1, 1)
LAST_DAY = date(2099, 12, 31)
EVALUATION_EVERY = 10  # every 10th row is held out: a 90/10 train/evaluation split


def ordinal_word(day: int) -> str:
    return _ORDINAL_WORDS[day - 1]


def ordinal_suffix(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


# Several surface forms, so the adapter learns the mapping rather than one template.
PHRASINGS: tuple[Callable[[date], str], ...] = (
    lambda d: f"the {ordinal_word(d.day)} of {MONTHS[d.month - 1]}, {d.year}",
    lambda d: f"{MONTHS[d.month - 1]} the {ordinal_word(d.day)}, {d.year}",
    lambda d: f"{MONTHS[d.month - 1]} {ordinal_suffix(d.day)}, {d.year}",
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{WEEKDAYS[d.weekday()]}, the {ordinal_word(d.day)} of {MONTHS[d.month - 1]} {d.year}",
)


def demo_rows(rows: int = 600, seed: int = 0) -> list[dict[str, str]]:
    """Rows of {prompt, completion, split}; the same arguments always give the same rows."""
    span = (LAST_DAY - FIRST_DAY).days + 1
    if not EVALUATION_EVERY <= rows <= span:
        raise ValueError(f"rows must be between {EVALUATION_EVERY} and {span}, got {rows}")
    rng = random.Random(seed)
    # Distinct dates, so no evaluation question also appears in training.
    days = [FIRST_DAY + timedelta(days=offset) for offset in rng.sample(range(span), rows)]
    return [
        {
            "prompt": PROMPT_TEMPLATE.format(phrase=rng.choice(PHRASINGS)(day)),
            "completion": day.isoformat(),
            SPLIT_COLUMN: (
                Split.EVALUATION if index % EVALUATION_EVERY == EVALUATION_EVERY - 1 else Split.TRAIN
            ).value,
        }
        for index, day in enumerate(days)
    ]


def write_demo_dataset(
    path: Path, *, rows: int = 600, seed: int = 0, file_format: Literal["jsonl", "csv"] = "jsonl"
) -> Path:
    """Write the demo dataset to `path` as JSON Lines or CSV and return the path."""
    if file_format not in ("jsonl", "csv"):
        raise ValueError(f"file_format must be 'jsonl' or 'csv', got {file_format!r}")
    records = demo_rows(rows, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as out:
        if file_format == "csv":
            writer = csv.DictWriter(
                out, fieldnames=["prompt", "completion", SPLIT_COLUMN], lineterminator="\n"
            )
            writer.writeheader()
            writer.writerows(records)
        else:
            out.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return path


def exact_match(prediction: str, reference: str) -> bool:
    """Score one generation as the quality report does: the whole answer, trimmed, is the reference (an
    answer that runs on past the date is not the date)."""
    answer = prediction.strip()
    return bool(answer) and answer == reference.strip()
