"""Tests for dataset validation: format detection, profiles, and the error messages users act on."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.services.dataset_files.formats import (
    MAX_COLUMNS,
    MAX_NESTING,
    MAX_ROW_BYTES,
    SUPPORTED_EXTENSIONS,
    DatasetFormatError,
    DatasetProfile,
    profile_dataset,
)

# --- helpers ---------------------------------------------------------------------------------


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    return (data[start : start + size] for start in range(0, len(data), size))


def profile(data: bytes, file_name: str, *, chunk_size: int = 1 << 16, **kwargs: Any) -> DatasetProfile:
    return profile_dataset(chunked(data, chunk_size), file_name, **kwargs)


def error_for(data: bytes, file_name: str, **kwargs: Any) -> str:
    with pytest.raises(DatasetFormatError) as caught:
        profile(data, file_name, **kwargs)
    return str(caught.value)


def jsonl(*rows: Any) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def csv_bytes(*records: list[str]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(records)
    return out.getvalue().encode()


def parquet_bytes(tmp_path: Path, table: pa.Table) -> bytes:
    path = tmp_path / "data.parquet"
    pq.write_table(table, path)
    return path.read_bytes()


def pc(prompt: str, completion: str, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "completion": completion, **extra}


def chat(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


# --- successful profiles ---------------------------------------------------------------------


def test_supported_extensions_cover_every_file_format() -> None:
    assert {".csv", ".jsonl", ".ndjson", ".json", ".parquet", ".pq"} == SUPPORTED_EXTENSIONS


def test_csv_prompt_completion_is_profiled() -> None:
    data = csv_bytes(["prompt", "completion", "source"], ["2+2=", "4", "a"], ["3+3=", "6", "b"])
    result = profile(data, "math.csv")
    assert result.file_format == "csv"
    assert result.format == "prompt_completion"
    assert result.row_count == 2
    assert result.columns == ["prompt", "completion", "source"]  # extra columns kept, ignored
    assert result.split_counts == {"train": 2}
    assert result.preview[0] == {"prompt": "2+2=", "completion": "4", "source": "a"}
    assert result.size_bytes == len(data)


def test_csv_with_utf8_bom_and_crlf_line_endings_is_accepted() -> None:
    data = b"\xef\xbb\xbfprompt,completion\r\nhi,there\r\n\r\nbye,now\r\n"
    result = profile(data, "excel.csv")
    assert result.columns == ["prompt", "completion"]
    assert result.row_count == 2
    assert result.preview[1] == {"prompt": "bye", "completion": "now"}


def test_csv_quoted_field_spanning_lines_keeps_its_line_breaks() -> None:
    data = csv_bytes(["prompt", "completion"], ["line one\nline two", "ok"], ["p", "c"])
    result = profile(data, "multi.csv")
    assert result.row_count == 2
    assert result.preview[0]["prompt"] == "line one\nline two"


def test_jsonl_prompt_completion_is_profiled() -> None:
    data = jsonl(pc("a", "b"), pc("c", "d", weight=2)) + b"\n  \n"  # trailing blank lines are fine
    result = profile(data, "data.jsonl")
    assert result.file_format == "jsonl"
    assert result.format == "prompt_completion"
    assert result.row_count == 2
    assert result.columns == ["prompt", "completion", "weight"]
    assert result.preview[1] == {"prompt": "c", "completion": "d", "weight": 2}


def test_json_array_is_profiled() -> None:
    data = json.dumps([pc("a", "b"), pc("c", "d"), pc("", "e")], indent=2).encode()
    result = profile(data, "data.json")
    assert (result.file_format, result.format, result.row_count) == ("json", "prompt_completion", 3)


def test_jsonl_saved_with_json_extension_is_read_as_jsonl() -> None:
    result = profile(jsonl(pc("a", "b"), pc("c", "d")), "data.json")
    assert (result.file_format, result.row_count) == ("jsonl", 2)


def test_parquet_prompt_completion_is_profiled(tmp_path: Path) -> None:
    table = pa.table({"prompt": ["a", "b", "c"], "completion": ["x", "y", "z"], "id": [1, 2, 3]})
    result = profile(parquet_bytes(tmp_path, table), "data.parquet")
    assert (result.file_format, result.format, result.row_count) == ("parquet", "prompt_completion", 3)
    assert result.columns == ["prompt", "completion", "id"]
    assert result.preview[2] == {"prompt": "c", "completion": "z", "id": 3}


def test_parquet_messages_column_of_structs_is_accepted(tmp_path: Path) -> None:
    table = pa.table({"messages": [chat(("user", "hi"), ("assistant", "hello"))]})
    result = profile(parquet_bytes(tmp_path, table), "chat.pq")
    assert (result.format, result.row_count) == ("messages", 1)
    json.dumps(result.preview)  # JSON-serialisable


def test_messages_in_jsonl_are_profiled() -> None:
    rows = [
        {"messages": chat(("system", "be brief"), ("user", "hi"), ("assistant", "hello"))},
        {"messages": chat(("user", "2+2?"), ("assistant", "4"), ("user", "and 3+3?"), ("assistant", "6"))},
    ]
    result = profile(jsonl(*rows), "chat.jsonl")
    assert (result.format, result.row_count, result.columns) == ("messages", 2, ["messages"])


def test_messages_in_csv_are_parsed_from_json_strings() -> None:
    cell = json.dumps(chat(("user", "hi, there"), ("assistant", "hello")))
    result = profile(csv_bytes(["messages", "split"], [cell, "train"], [cell, "evaluation"]), "chat.csv")
    assert result.format == "messages"
    assert result.split_counts == {"train": 1, "evaluation": 1}


def test_text_format_is_detected_for_continued_pretraining() -> None:
    result = profile(jsonl({"text": "Once upon a time."}, {"text": "The end."}), "corpus.jsonl")
    assert (result.format, result.row_count) == ("text", 2)


def test_split_column_is_counted_with_aliases_normalised_to_evaluation() -> None:
    splits = ["train"] * 6 + ["evaluation", "eval", " Validation ", "TEST"]
    data = jsonl(*(pc("p", "c", split=split) for split in splits))
    assert profile(data, "d.jsonl").split_counts == {"train": 6, "evaluation": 4}


def test_preview_keeps_first_rows_and_truncates_long_strings() -> None:
    data = jsonl(*(pc(f"prompt {i}", "x" * 2000) for i in range(10)))
    result = profile(data, "long.jsonl", preview_rows=3)
    assert [row["prompt"] for row in result.preview] == ["prompt 0", "prompt 1", "prompt 2"]
    completion = result.preview[0]["completion"]
    assert 500 <= len(completion) <= 510
    assert completion.startswith("x" * 500)


def test_sha256_and_size_describe_the_raw_bytes() -> None:
    data = jsonl(*(pc(f"p{i}", f"c{i}") for i in range(50)))
    result = profile(data, "d.jsonl", chunk_size=13)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert result.size_bytes == len(data)


@pytest.mark.parametrize("file_name", ["data.csv", "data.jsonl"])
def test_tiny_chunks_splitting_multibyte_characters_give_the_same_profile(file_name: str) -> None:
    rows = [pc("Grüße aus Köln", "日本語で答える"), pc("naïve café", "ünïcödé ✓")]
    if file_name.endswith(".csv"):
        data = csv_bytes(["prompt", "completion"], *([r["prompt"], r["completion"]] for r in rows))
    else:
        data = jsonl(*rows)
    boundaries = range(7, len(data), 7)
    assert any(data[b] & 0xC0 == 0x80 for b in boundaries)  # some chunk starts mid-character
    assert profile(data, file_name, chunk_size=7) == profile(data, file_name)
    assert profile(data, file_name, chunk_size=7).preview[0]["completion"] == "日本語で答える"


def test_file_larger_than_the_in_memory_spool_is_profiled() -> None:
    data = jsonl(*(pc(f"prompt {i}", "y" * 100) for i in range(50_000)))
    assert len(data) > 5 * 1024 * 1024
    result = profile(data, "big.jsonl", chunk_size=1 << 20)
    assert result.row_count == 50_000
    assert result.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("first_bytes", "expected"),
    [(b"  [", "json"), (b"\n{", "jsonl"), (b"prompt,", "csv")],
)
def test_unknown_extension_is_sniffed_from_content(first_bytes: bytes, expected: str) -> None:
    rows = [pc("a", "b")]
    data = {
        "json": b"  " + json.dumps(rows).encode(),
        "jsonl": b"\n" + jsonl(*rows),
        "csv": csv_bytes(["prompt", "completion"], ["a", "b"]),
    }[expected]
    assert data.startswith(first_bytes)
    assert profile(data, "upload.bin").file_format == expected


def test_parquet_is_recognised_by_magic_bytes_and_mime_type_is_a_fallback(tmp_path: Path) -> None:
    table = pa.table({"prompt": ["a"], "completion": ["b"]})
    assert profile(parquet_bytes(tmp_path, table), "upload").file_format == "parquet"
    data = jsonl(pc("a", "b"))
    assert profile(data, "blob", mime_type="application/x-ndjson").file_format == "jsonl"
    assert profile(data, "rows.ndjson").file_format == "jsonl"


# --- errors ----------------------------------------------------------------------------------


def test_zero_byte_file_is_empty() -> None:
    assert "data.csv is empty (0 bytes)" in error_for(b"", "data.csv")


def test_header_only_csv_is_empty() -> None:
    assert "data.csv is empty: it has no data rows" in error_for(b"prompt,completion\n\n", "data.csv")


def test_whitespace_only_file_is_empty() -> None:
    assert "is empty: it holds only whitespace" in error_for(b" \n\t\r\n", "data.jsonl")


def test_empty_json_array_is_empty() -> None:
    assert "is empty" in error_for(b"[]", "data.json")


def test_non_utf8_csv_names_offset_line_and_fix() -> None:
    data = b"prompt,completion\nhello,world\ncaf\xe9,ok\n"
    message = error_for(data, "latin1.csv")
    assert "not UTF-8" in message
    assert "byte 0xe9 at offset 33" in message
    assert "(line 3)" in message
    assert "re-save the file as UTF-8" in message


def test_non_utf8_jsonl_names_the_line() -> None:
    data = jsonl(pc("a", "b")) + b'{"prompt": "\xff", "completion": "x"}\n'
    message = error_for(data, "bad.jsonl")
    assert "(line 2)" in message and "UTF-8" in message


def test_non_utf8_json_names_offset_and_line() -> None:
    data = b'[\n{"prompt": "a", "completion": "b"},\n{"prompt": "\xfe", "completion": "c"}\n]'
    message = error_for(data, "bad.json")
    offset = data.index(b"\xfe")
    assert f"offset {offset}" in message and "(line 3)" in message and "UTF-8" in message


def test_malformed_jsonl_line_names_line_and_json_error() -> None:
    data = jsonl(pc("a", "b"), pc("c", "d")) + b'{"prompt": "e" "completion": "f"}\n'
    message = error_for(data, "bad.jsonl")
    assert message.startswith("line 3: invalid JSON: Expecting ',' delimiter")


def test_jsonl_line_that_is_not_an_object_names_the_line() -> None:
    data = jsonl(pc("a", "b"), ["a", "b"])
    assert error_for(data, "bad.jsonl").startswith("line 2: expected a JSON object")
    assert "found an array" in error_for(data, "bad.jsonl")


def test_unrecognised_columns_are_listed_with_the_expected_ones() -> None:
    data = csv_bytes(["question", "answer"], ["q", "a"])
    message = error_for(data, "qa.csv")
    assert "found columns ['question', 'answer']" in message
    assert "expected 'prompt' and 'completion' (instruction tuning), 'messages' (chat)" in message
    assert "'text' (continued pretraining)" in message


def test_prompt_without_completion_is_a_prompts_dataset_for_grpo() -> None:
    # Other columns stay: GRPO hands them to the reward functions. An SFT job on it is refused at creation.
    result = profile(jsonl({"prompt": "a", "answer": "b"}), "d.jsonl")
    assert (result.format, result.columns) == ("prompt", ["prompt", "answer"])


def test_completion_without_prompt_names_the_missing_column() -> None:
    message = error_for(csv_bytes(["input", "completion"], ["a", "b"]), "d.csv")
    assert "a 'completion' column but no 'prompt' column" in message


def test_capitalised_column_names_get_a_case_hint() -> None:
    message = error_for(csv_bytes(["Prompt", "Completion"], ["a", "b"]), "d.csv")
    assert "case-sensitive" in message


def test_empty_completions_in_csv_name_data_rows_and_lines() -> None:
    data = csv_bytes(["prompt", "completion"], ["a", "ok"], ["b", ""], ["c", "ok"], ["d", "   "])
    message = error_for(data, "d.csv")
    assert message.startswith("2 rows have an empty 'completion' (row 2 (line 3), row 4 (line 5))")


def test_empty_and_null_completions_in_jsonl_are_counted_beyond_the_listed_few() -> None:
    rows = [pc("p", "ok")] + [{"prompt": "p", "completion": None}] * 3 + [pc("p", "")] * 4
    message = error_for(jsonl(*rows), "d.jsonl")
    assert message.startswith("7 rows have an empty 'completion' (line 2, line 3, line 4, line 5, line 6")
    assert "and 2 more" in message


def test_empty_prompt_is_allowed() -> None:
    assert profile(jsonl(pc("", "a story")), "d.jsonl").row_count == 1


def test_non_string_completion_names_the_row_and_type() -> None:
    message = error_for(jsonl(pc("2+2", "4"), {"prompt": "3+3", "completion": 6}), "d.jsonl")
    assert message == "line 2: 'completion' must be a string, found a number"


def test_empty_text_rows_are_named() -> None:
    message = error_for(jsonl({"text": "fine"}, {"text": " "}), "d.jsonl")
    assert message.startswith("1 row has an empty 'text' (line 2)")


def test_messages_without_an_assistant_turn_are_named() -> None:
    rows = [{"messages": chat(("user", "hi"), ("assistant", "yo"))}, {"messages": chat(("user", "hi"))}]
    message = error_for(jsonl(*rows), "chat.jsonl")
    assert message.startswith("1 row has no assistant turn in 'messages' (line 2)")


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ("not a list", "line 1: 'messages' is not valid JSON"),
        ({"role": "user"}, "line 1: 'messages' must be a non-empty list of {role, content} objects"),
        ([], "found an empty list"),
        (["hi"], "line 1: message 1 must be an object with 'role' and 'content', found a string"),
        ([{"content": "hi"}], "line 1: message 1 has no 'role'"),
        ([{"role": "bot", "content": "hi"}], "message 1 has role 'bot'; use one of system, user, assistant"),
        ([{"role": "user", "content": "a"}, {"role": "assistant"}], "message 2 (assistant) has no 'content'"),
        ([{"role": "user", "content": ["a"]}], "message 1 (user) 'content' must be a string, found an array"),
    ],
)
def test_malformed_messages_name_the_row_and_the_problem(messages: Any, expected: str) -> None:
    assert expected in error_for(jsonl({"messages": messages}), "chat.jsonl")


def test_messages_cell_with_invalid_json_in_csv_names_data_row_and_line() -> None:
    good = json.dumps(chat(("user", "a"), ("assistant", "b")))
    data = csv_bytes(["messages"], [good], ["[{'role': 'user'}]"])
    assert error_for(data, "chat.csv").startswith("row 2 (line 3): 'messages' is not valid JSON")


def test_corrupt_parquet_is_reported_as_unreadable(tmp_path: Path) -> None:
    data = parquet_bytes(tmp_path, pa.table({"prompt": ["a"] * 100, "completion": ["b"] * 100}))
    message = error_for(data[: len(data) // 2], "data.parquet")
    assert message.startswith("data.parquet is not a readable Parquet file")


def test_non_parquet_bytes_with_parquet_extension_are_unreadable() -> None:
    assert "is not a readable Parquet file" in error_for(b"prompt,completion\na,b\n", "data.parquet")


def test_ragged_csv_row_names_row_line_and_field_counts() -> None:
    data = b"prompt,completion\na,b\nc,d,e\n"
    message = error_for(data, "d.csv")
    assert message.startswith("row 2 (line 3) has 3 fields but the header has 2")
    assert "quote fields that contain commas" in message


def test_csv_with_unclosed_quote_names_where_the_record_starts() -> None:
    data = b'prompt,completion\na,b\n"c,d\ne,f\n'
    message = error_for(data, "d.csv")
    assert message.startswith("lines 3-4: unreadable CSV: unexpected end of data")
    assert "unclosed or stray double quote" in message


def test_csv_field_over_the_csv_module_limit_suggests_jsonl() -> None:
    data = b"text\n" + b"x" * 200_000 + b"\n"
    message = error_for(data, "long.csv")
    assert message.startswith("line 2: unreadable CSV")
    assert "use JSONL or Parquet for long texts" in message


def test_csv_header_with_duplicate_column_is_rejected() -> None:
    assert "names column 'prompt' more than once" in error_for(b"prompt,prompt,completion\na,b,c\n", "d.csv")


def test_json_object_instead_of_array_is_rejected() -> None:
    data = json.dumps({"data": [pc("a", "b")]}, indent=2).encode()
    message = error_for(data, "d.json")
    assert message.startswith("d.json holds an object, not an array of objects")
    assert "one object per line in a .jsonl file" in message


def test_json_array_of_non_objects_names_the_row() -> None:
    message = error_for(json.dumps([pc("a", "b"), "c"]).encode(), "d.json")
    assert message == "row 2: expected a JSON object, found a string"


def test_invalid_json_document_names_the_row_and_the_problem() -> None:
    message = error_for(b'[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": }\n]', "d.json")
    assert message.startswith("row 2: invalid JSON: unallowed token at this point in JSON text near")
    assert '{"prompt": }' in message


def test_unknown_split_value_names_row_and_value() -> None:
    data = csv_bytes(["prompt", "completion", "split"], ["a", "b", "train"], ["c", "d", "holdout"])
    message = error_for(data, "d.csv")
    assert message.startswith("row 2 (line 3): split is 'holdout'; use 'train' or 'evaluation'")


def test_split_without_any_training_rows_is_rejected() -> None:
    message = error_for(jsonl(pc("a", "b", split="evaluation")), "d.jsonl")
    assert "no row has split 'train'" in message


def test_read_rows_reads_what_the_profiler_accepted_with_the_same_detection() -> None:
    from app.services.dataset_files.formats import read_rows

    # Named .csv but starting like JSON: the extension decides, for validation and reading alike.
    data = b'prompt,completion\n"{not json",x\n'
    assert profile_dataset([data], "odd.csv").file_format == "csv"
    assert read_rows([data[:5], data[5:]], "odd.csv") == [{"prompt": "{not json", "completion": "x"}]


# --- bounds: nesting, row size, columns, encodings ------------------------------------------------


def test_deeply_nested_json_array_row_is_named_and_found_streaming() -> None:
    poison = b"[" * 200_000 + b"]" * 200_000
    started = time.monotonic()
    message = error_for(b'[{"prompt": "a", "completion": "b"}, ' + poison[1:], "poison.json")
    assert message == f"row 2: JSON nested more than {MAX_NESTING} levels deep"
    assert time.monotonic() - started < 2  # stops at the bound instead of building 200,000 levels


def test_deeply_nested_jsonl_line_is_named() -> None:
    data = jsonl(pc("a", "b")) + b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b', "completion": "c"}\n'
    assert error_for(data, "d.jsonl").startswith(f"line 2: JSON nested more than {MAX_NESTING} levels deep")


def test_nesting_up_to_the_bound_is_accepted() -> None:
    value: Any = "deep"
    for _ in range(MAX_NESTING - 2):  # the row is level 1 and 'meta' level 2
        value = [value]
    assert profile(jsonl(pc("a", "b", meta=value)), "d.jsonl").row_count == 1
    assert profile(json.dumps([pc("a", "b", meta=value)]).encode(), "d.json").row_count == 1


def test_a_line_longer_than_a_row_may_be_is_named_before_it_is_read_whole() -> None:
    data = jsonl(pc("a", "b")) + b'{"prompt": "' + b"x" * MAX_ROW_BYTES + b'", "completion": "c"}\n'
    assert error_for(data, "d.jsonl").startswith(f"line 2 is longer than {MAX_ROW_BYTES} bytes")


def test_a_json_array_row_larger_than_a_row_may_be_is_named() -> None:
    big = pc("x" * (MAX_ROW_BYTES // 2), "y" * (MAX_ROW_BYTES // 2 + 10))
    message = error_for(json.dumps([pc("a", "b"), big]).encode(), "d.json")
    assert message.startswith(f"row 2 is larger than {MAX_ROW_BYTES} bytes")


def test_too_many_distinct_columns_are_refused() -> None:
    rows = [pc("a", "b", **{f"extra{i}": 1}) for i in range(MAX_COLUMNS)]
    assert f"more than {MAX_COLUMNS} distinct columns" in error_for(jsonl(*rows), "d.jsonl")
    header = ["prompt", "completion", *(f"c{i}" for i in range(MAX_COLUMNS))]
    assert f"at most {MAX_COLUMNS}" in error_for(csv_bytes(header, ["a"] * len(header)), "d.csv")


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_utf16_and_utf32_files_are_named_as_such(encoding: str) -> None:
    data = "prompt,completion\nq,a\n".encode(encoding)
    assert error_for(data, "d.csv") == f"d.csv is {encoding.upper()} text; re-save the file as UTF-8"


def test_a_number_past_pythons_digit_limit_is_named() -> None:
    data = b'{"prompt": "a", "completion": "b", "n": ' + b"9" * 5000 + b"}\n"
    assert error_for(data, "d.jsonl").startswith("line 1: invalid JSON")
    assert error_for(b"[" + data.strip() + b"]", "d.json").startswith("row 1: invalid JSON")


def test_json_array_with_a_byte_order_mark_is_read() -> None:
    assert profile(b"\xef\xbb\xbf" + json.dumps([pc("a", "b")]).encode(), "d.json").row_count == 1
