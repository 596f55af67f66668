"""Owns folding a file's rows into its profile: kind, columns, problems over every row, splits, preview."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tuneforge.rules.datasets import LABEL_COLUMN, SPLIT_COLUMN, DatasetKind, Split, kind_of_columns, split_of

from app.services.dataset_files import task_rows
from app.services.dataset_files.rows import (
    MAX_COLUMNS,
    DatasetFormatError,
    FileFormat,
    Problem,
    RowCheck,
    check_messages,
    check_prompt_completion,
    check_text,
    previewable,
    quoted,
)

_EXPECTED_COLUMNS = (
    "expected 'prompt' and 'completion' (instruction tuning), 'messages' (chat), "
    "'text' (continued pretraining), 'text' and 'label' (classification), 'prompt' (or 'messages') "
    "with 'chosen' and 'rejected' (preference pairs; or OpenAI's 'input', 'preferred_output' and "
    "'non_preferred_output'), or 'prompt' alone (prompts for GRPO)"
)
_KNOWN_COLUMNS = {
    "prompt",
    "completion",
    "messages",
    "text",
    "label",
    "chosen",
    "rejected",
    "input",
    "preferred_output",
    "non_preferred_output",
}
_NEXT_TOKEN_CHECKS: dict[str, RowCheck] = {
    "prompt_completion": check_prompt_completion,
    "messages": check_messages,
    "text": check_text,
}
_LISTED_ROWS = 5  # how many offending rows an error message names before summarising


@dataclass(frozen=True)
class DatasetProfile:
    file_format: FileFormat
    format: DatasetKind
    row_count: int
    columns: list[str]
    split_counts: dict[str, int]
    preview: list[dict[str, Any]]
    size_bytes: int
    sha256: str


@dataclass
class _Offenders:
    """Rows sharing one fixable problem, reported together so one re-upload fixes them all."""

    count: int = 0
    where: list[str] = field(default_factory=list)

    def add(self, where: str) -> None:
        self.count += 1
        if len(self.where) < _LISTED_ROWS:
            self.where.append(where)

    def describe(self, problem: Problem) -> str:
        what, fix = problem
        more = f", and {self.count - len(self.where)} more" if self.count > len(self.where) else ""
        rows = "1 row has" if self.count == 1 else f"{self.count} rows have"
        return f"{rows} {what} ({', '.join(self.where)}{more}); {fix}"


class RowChecker:
    """Folds rows into a profile; the first row decides the dataset kind."""

    def __init__(self, preview_rows: int) -> None:
        self._preview_rows = preview_rows
        self.kind: DatasetKind | None = None
        self._check: RowCheck = check_text  # the kind's check, once the first row has named the kind
        self._labels: task_rows.LabelTally | None = None  # classification files only
        self.has_split = False
        self.columns: dict[str, None] = {}  # ordered union of keys seen
        self.row_count = 0
        self.split_counts = {Split.TRAIN.value: 0, Split.EVALUATION.value: 0}
        self.preview: list[dict[str, Any]] = []
        self.offenders: dict[Problem, _Offenders] = {}

    def add(self, where: str, values: dict[str, Any]) -> None:
        if self.kind is None:
            self._begin(list(values))
            self.has_split = SPLIT_COLUMN in values
        self._add_columns(where, values)
        self.row_count += 1
        problem = self._check(where, values)
        if problem:
            self.offenders.setdefault(problem, _Offenders()).add(where)
        split = _split_of(where, values.get(SPLIT_COLUMN)) if self.has_split else Split.TRAIN.value
        self.split_counts[split] += 1
        if self._labels is not None and problem is None:
            self._labels.add(where, values[LABEL_COLUMN], split)
        if len(self.preview) < self._preview_rows:
            self.preview.append({str(key): previewable(value) for key, value in values.items()})

    def _begin(self, columns: list[str]) -> None:
        self.kind = _detect_kind(columns)
        check = _NEXT_TOKEN_CHECKS.get(self.kind) or task_rows.check_for(self.kind, columns)
        if check is None:  # a kind added to the rules without a check here: a bug, not the file's fault
            raise RuntimeError(f"no row check for dataset kind {self.kind!r}")
        self._check = check
        if self.kind == "classification":
            self._labels = task_rows.LabelTally()

    def _add_columns(self, where: str, values: dict[str, Any]) -> None:
        if len(self.columns) + len(values) > MAX_COLUMNS:  # cheap bound first; exact check below
            new = [key for key in values if key not in self.columns]
            if len(self.columns) + len(new) > MAX_COLUMNS:
                raise DatasetFormatError(
                    f"{where}: the file has more than {MAX_COLUMNS} distinct columns (keys); a training "
                    "row needs only the columns of its kind (such as prompt/completion, messages or text) "
                    "plus an optional split"
                )
        self.columns.update(dict.fromkeys(values))

    def finish(self, name: str, file_format: FileFormat, size: int, sha256: str) -> DatasetProfile:
        if self.kind is None:
            raise DatasetFormatError(f"{name} is empty: it has no data rows")
        if self.offenders:
            raise DatasetFormatError("; ".join(o.describe(p) for p, o in self.offenders.items()))
        if self.split_counts["train"] == 0:
            raise DatasetFormatError("no row has split 'train'; at least one training row is needed")
        if self._labels is not None:
            self._labels.finish()
        return DatasetProfile(
            file_format=file_format,
            format=self.kind,
            row_count=self.row_count,
            columns=list(self.columns),
            split_counts={split: n for split, n in self.split_counts.items() if n or split == "train"},
            preview=self.preview,
            size_bytes=size,
            sha256=sha256,
        )


def _detect_kind(columns: list[str]) -> DatasetKind:
    lacking = task_rows.half_a_pair(columns)
    if lacking:
        raise DatasetFormatError(f"found columns {_column_list(columns)}: {lacking}")
    kind = kind_of_columns(columns)
    if kind is not None:
        return kind
    present = set(columns)
    if "completion" in present:
        raise DatasetFormatError(
            f"found columns {_column_list(columns)}: there is a 'completion' column but no 'prompt' "
            "column; instruction tuning needs both 'prompt' and 'completion'"
        )
    if LABEL_COLUMN in present:
        raise DatasetFormatError(
            f"found columns {_column_list(columns)}: there is a 'label' column but no 'text' column; "
            "classification needs both 'text' and 'label'"
        )
    hint = ""
    if _KNOWN_COLUMNS & {str(c).strip().lower() for c in columns}:
        hint = " (column names are case-sensitive: use lower case)"
    raise DatasetFormatError(f"found columns {_column_list(columns)}; {_EXPECTED_COLUMNS}{hint}")


def _column_list(columns: list[str]) -> str:
    shown = [quoted(column) for column in columns[: _LISTED_ROWS * 2]]
    more = f", and {len(columns) - len(shown)} more" if len(columns) > len(shown) else ""
    return f"[{', '.join(shown)}{more}]"


def _split_of(where: str, value: object) -> str:
    split = split_of(value)
    if split is None:
        raise DatasetFormatError(
            f"{where}: split is {quoted(value)}; use 'train' or 'evaluation' "
            "('eval', 'validation' and 'test' also mean evaluation)"
        )
    return split
