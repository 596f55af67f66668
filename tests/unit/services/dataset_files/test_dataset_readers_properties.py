"""Property tests for the dataset readers: whatever the bytes, validation ends in a verdict.

A verdict is a profile (the file is connected) or a DatasetFormatError with a message; any other
exception (RecursionError, UnicodeError, ValueError from a parser, ...) would leave a dataset
`validating` or take a worker down, and fails these tests.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from app.services.dataset_files.formats import (
    MAX_NESTING,
    DatasetFormatError,
    DatasetProfile,
    profile_dataset,
    read_rows,
)

FILE_NAMES = ("data.csv", "data.jsonl", "data.json", "data.parquet", "data.txt")
# Bounded runs: the suite must stay fast; `--hypothesis-seed` reproduces a failure.
QUICK = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
row_keys = st.sampled_from(["prompt", "completion", "messages", "text", "split", "other"])
rows = st.dictionaries(row_keys, json_values, min_size=1, max_size=5)
prompt_completion = st.fixed_dictionaries(
    {"prompt": st.text(max_size=30), "completion": st.text(min_size=1, max_size=30)}
)


def verdict(data: bytes, file_name: str, chunk: int = 4096) -> DatasetProfile | DatasetFormatError:
    """The profile, or the DatasetFormatError; anything else propagates and fails the test."""
    chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
    try:
        profile = profile_dataset(chunks, file_name)
    except DatasetFormatError as exc:
        assert str(exc).strip(), "an error must say what is wrong"
        return exc
    # What validation accepted, the training side reads back row for row.
    assert len(read_rows(chunks, file_name)) == profile.row_count
    return profile


@QUICK
@given(data=st.binary(max_size=2048), file_name=st.sampled_from(FILE_NAMES))
@example(data=b"\xff\xfe" + "prompt,completion\n".encode("utf-16-le"), file_name="data.csv")
@example(data=b"PAR1\x00\x00PAR1", file_name="data.parquet")
@example(data=b"[" * 5000, file_name="data.json")
@example(data=b"1" * 5000, file_name="data.json")
def test_random_bytes_get_a_verdict(data: bytes, file_name: str) -> None:
    verdict(data, file_name)


@QUICK
@given(values=st.lists(rows, max_size=6), as_lines=st.booleans(), file_name=st.sampled_from(FILE_NAMES))
def test_random_json_rows_get_a_verdict(values: list[dict[str, Any]], as_lines: bool, file_name: str) -> None:
    if as_lines:
        data = "".join(json.dumps(v, allow_nan=True) + "\n" for v in values).encode()
    else:
        data = json.dumps(values, allow_nan=True).encode()
    verdict(data, file_name)


@QUICK
@given(
    depth=st.integers(min_value=1, max_value=20_000),
    opener=st.sampled_from(["[", '{"a":', '{"messages":[']),
    file_name=st.sampled_from(["d.json", "d.jsonl", "d.csv"]),
    closed=st.booleans(),
)
@example(depth=200_000, opener="[", file_name="d.json", closed=True)
@example(depth=200_000, opener="[", file_name="d.jsonl", closed=True)
def test_nesting_of_any_depth_gets_a_verdict(depth: int, opener: str, file_name: str, closed: bool) -> None:
    closer = {"[": "]", '{"a":': "}", '{"messages":[': "]}"}[opener]
    body = opener * depth + "1" + (closer * depth if closed else "")
    if file_name == "d.json":
        data = f'[{{"text": {body}}}]'.encode()
    elif file_name == "d.jsonl":
        data = f'{{"text": {body}}}\n'.encode()
    else:
        data = b'messages\n"' + body.replace('"', '""').encode() + b'"\n'
    result = verdict(data, file_name)
    if depth + 2 > MAX_NESTING and closed and file_name != "d.csv":
        assert isinstance(result, DatasetFormatError) and f"nested more than {MAX_NESTING}" in str(result)


@QUICK
@given(
    number=st.one_of(
        st.integers(min_value=1, max_value=20_000).map(lambda n: "9" * n),
        st.integers(min_value=1, max_value=5000).map(lambda n: f"1e{n}"),
        st.integers(min_value=1, max_value=5000).map(lambda n: f"-1e-{n}"),
        st.sampled_from(["NaN", "Infinity", "-Infinity", "-0", "1.5E+308", "4.9e-324"]),
    ),
    file_name=st.sampled_from(["d.json", "d.jsonl"]),
)
def test_huge_and_odd_numbers_get_a_verdict(number: str, file_name: str) -> None:
    row = f'{{"prompt": "p", "completion": "c", "n": {number}}}'
    data = f"[{row}]".encode() if file_name == "d.json" else f"{row}\n".encode()
    verdict(data, file_name)


@QUICK
@given(
    values=st.lists(prompt_completion, min_size=1, max_size=5),
    encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "latin-1"]),
    file_name=st.sampled_from(["d.csv", "d.jsonl", "d.json"]),
)
def test_odd_encodings_get_a_verdict(values: list[dict[str, str]], encoding: str, file_name: str) -> None:
    text = _as_text(values, file_name)
    try:
        data = text.encode(encoding)
    except UnicodeEncodeError:
        assume(False)
    result = verdict(data, file_name)
    if encoding in ("utf-16", "utf-32"):  # with a byte-order mark: named as such
        assert isinstance(result, DatasetFormatError) and encoding.upper() in str(result)


@QUICK
@given(
    values=st.lists(prompt_completion, min_size=1, max_size=5),
    file_name=st.sampled_from(["d.csv", "d.jsonl", "d.json"]),
    position=st.floats(min_value=0, max_value=1),
    bad=st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82"]),
)
def test_invalid_utf8_is_named_as_such(
    values: list[dict[str, str]], file_name: str, position: float, bad: bytes
) -> None:
    data = _as_text(values, file_name).encode()
    at = int(position * len(data))
    result = verdict(data[:at] + bad + data[at:], file_name)
    assert isinstance(result, DatasetFormatError)
    if file_name != "d.csv" or "UTF-8" in str(result):  # CSV may first fail on a broken record
        assert "UTF-8" in str(result)


@settings(max_examples=60, deadline=None)
@given(
    columns=st.dictionaries(
        st.sampled_from(["prompt", "completion", "text", "messages", "split", "n"]),
        st.sampled_from(["str", "int", "float", "list", "struct", "null"]),
        min_size=1,
        max_size=4,
    ),
    length=st.integers(min_value=0, max_value=5),
    flips=st.lists(st.tuples(st.floats(min_value=0, max_value=1), st.integers(0, 255)), max_size=3),
)
def test_parquet_tables_and_damaged_parquet_get_a_verdict(
    columns: dict[str, str], length: int, flips: list[tuple[float, int]]
) -> None:
    makers = {
        "str": lambda i: f"value {i}",
        "int": lambda i: i * 10**12,
        "float": lambda i: float("nan") if i == 2 else i / 3,
        "list": lambda i: [f"a{i}", "b"],
        "struct": lambda i: {"role": "user", "content": f"c{i}"},
        "null": lambda i: None,
    }
    table = pa.table({name: [makers[kind](i) for i in range(length)] for name, kind in columns.items()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    data = bytearray(buffer.getvalue())
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    verdict(bytes(data), "d.parquet")


@QUICK
@given(
    records=st.lists(
        st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=20), min_size=1, max_size=4),
        max_size=6,
    ),
    header=st.lists(st.sampled_from(["prompt", "completion", "messages", "text", "split", "x"]), max_size=4),
)
def test_random_csv_records_get_a_verdict(records: list[list[str]], header: list[str]) -> None:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([header, *records])
    verdict(out.getvalue().encode("utf-8", "surrogatepass"), "d.csv")


def _as_text(values: list[dict[str, str]], file_name: str) -> str:
    if file_name == "d.json":
        return json.dumps(values, ensure_ascii=False)
    if file_name == "d.jsonl":
        return "".join(json.dumps(v, ensure_ascii=False) + "\n" for v in values)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["prompt", "completion"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(values)
    return out.getvalue()
