"""Validation of the dataset kinds beyond next-token training: preference pairs (DPO), labelled texts
(classification) and prompts alone (GRPO), with the messages users act on."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pytest

from app.services.dataset_files.formats import DatasetFormatError, DatasetProfile, profile_dataset
from app.services.dataset_files.task_rows import MAX_LABEL_CHARS, MAX_LABELS


def profile(data: bytes, file_name: str) -> DatasetProfile:
    return profile_dataset([data], file_name)


def error_for(data: bytes, file_name: str = "d.jsonl") -> str:
    with pytest.raises(DatasetFormatError) as caught:
        profile(data, file_name)
    return str(caught.value)


def jsonl(*rows: Any) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def csv_bytes(*records: list[str]) -> bytes:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(records)
    return out.getvalue().encode()


def pair(prompt: str = "2+2?", chosen: Any = "4", rejected: Any = "5", **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **extra}


def says(role: str, content: Any) -> dict[str, Any]:
    return {"role": role, "content": content}


def openai_pair(
    messages: Any = None, preferred: Any = None, non_preferred: Any = None, **extra: Any
) -> dict[str, Any]:
    return {
        "input": {"messages": [says("user", "2+2?")] if messages is None else messages},
        "preferred_output": [says("assistant", "4")] if preferred is None else preferred,
        "non_preferred_output": [says("assistant", "5")] if non_preferred is None else non_preferred,
        **extra,
    }


def labelled(text: str = "great film", label: Any = "positive", **extra: Any) -> dict[str, Any]:
    return {"text": text, "label": label, **extra}


# --- preference pairs ------------------------------------------------------------------------


def test_prompt_chosen_rejected_rows_are_a_preference_dataset() -> None:
    data = jsonl(
        pair(), pair("Capital of France?", [says("assistant", "Paris")], [says("assistant", "Rome")])
    )
    result = profile(data, "prefs.jsonl")
    assert (result.format, result.row_count) == ("preference", 2)


def test_messages_with_chosen_and_rejected_in_csv_are_a_preference_dataset() -> None:
    turns = json.dumps([says("system", "be brief"), says("user", "2+2?")])
    result = profile(csv_bytes(["messages", "chosen", "rejected"], [turns, "4", "5"]), "prefs.csv")
    assert result.format == "preference"


def test_openai_dpo_rows_are_a_preference_dataset() -> None:
    result = profile(jsonl(openai_pair(), openai_pair()), "openai.jsonl")
    assert result.format == "preference"
    assert result.columns == ["input", "preferred_output", "non_preferred_output"]


def test_openai_dpo_rows_in_csv_cells_are_parsed_as_json() -> None:
    row = openai_pair()
    data = csv_bytes(list(row), [json.dumps(value) for value in row.values()])
    assert profile(data, "openai.csv").format == "preference"


def test_pairs_without_a_prompt_are_counted_and_named() -> None:
    data = jsonl(pair(), pair(prompt=""), pair(prompt="  "), {"chosen": "4", "rejected": "5", "prompt": None})
    message = error_for(data)
    assert message.startswith(
        "3 rows have no prompt (an empty 'prompt' and no 'messages') (line 2, line 3, line 4)"
    )
    assert "needs the prompt its answers reply to" in message


def test_a_row_with_both_a_prompt_and_messages_is_refused() -> None:
    data = jsonl(pair(messages=[says("user", "hi")]))
    assert "1 row has both a 'prompt' and 'messages' (line 1)" in error_for(data)


def test_empty_chosen_and_rejected_answers_are_named_by_column() -> None:
    data = jsonl(
        pair(), pair(chosen=""), pair(rejected=None), pair(chosen=[]), pair(rejected=[says("assistant", " ")])
    )
    message = error_for(data)
    assert "2 rows have an empty 'chosen' (line 2, line 4)" in message
    assert "2 rows have an empty 'rejected' (line 3, line 5)" in message
    assert "every preference pair needs both answers" in message


def test_identical_answers_teach_nothing_and_are_refused() -> None:
    message = error_for(jsonl(pair(), pair(chosen="4", rejected="4")))
    assert message.startswith("1 row has the same answer as 'chosen' and 'rejected' (line 2)")
    assert "difference between its answers" in message


@pytest.mark.parametrize(
    ("chosen", "fragment"),
    [
        (4, "line 1: 'chosen' must be a string or a list of assistant messages, found a number"),
        ({"role": "assistant", "content": "4"}, "'chosen' must be a string or a list of assistant messages"),
        (
            [says("user", "4")],
            "line 1, in 'chosen': message 1 has role 'user'; an answer holds only assistant",
        ),
        ([says("assistant", 4)], "line 1, in 'chosen': message 1 (assistant) 'content' must be a string"),
        (["4"], "line 1, in 'chosen': message 1 must be an object with 'role' and 'content', found a string"),
    ],
)
def test_malformed_answers_name_the_row_the_column_and_the_shape(chosen: Any, fragment: str) -> None:
    assert fragment in error_for(jsonl(pair(chosen=chosen)))


def test_a_malformed_prompt_in_messages_names_the_turn() -> None:
    data = jsonl({"messages": [{"role": "human", "content": "hi"}], "chosen": "a", "rejected": "b"})
    assert "line 1: message 1 has role 'human'" in error_for(data)


def test_a_non_string_prompt_is_refused() -> None:
    assert "line 1: 'prompt' must be a string, found an array" in error_for(jsonl(pair(prompt=["hi"])))


@pytest.mark.parametrize(
    ("row", "fragment"),
    [
        (openai_pair(input="hi"), "line 1: 'input' is not valid JSON"),
        ({**openai_pair(), "input": ["hi"]}, "line 1: 'input' must be an object with a 'messages' list"),
        ({**openai_pair(), "input": {}}, "line 1: 'input.messages' must be a non-empty list"),
        (openai_pair(messages=[]), "'input.messages' must be a non-empty list of {role, content} objects"),
        (openai_pair(messages=[says("user", None)]), "line 1, in 'input.messages': message 1 (user) has no"),
        (openai_pair(preferred="four"), "line 1: 'preferred_output' is not valid JSON"),
        (
            openai_pair(preferred="4"),
            "line 1: 'preferred_output' must be a list of assistant messages, found a",
        ),
        (
            openai_pair(preferred={"role": "assistant"}),
            "'preferred_output' must be a list of assistant messages",
        ),
        (
            openai_pair(non_preferred=[says("user", "5")]),
            "in 'non_preferred_output': message 1 has role 'user'",
        ),
    ],
)
def test_malformed_openai_rows_name_the_row_and_the_field(row: dict[str, Any], fragment: str) -> None:
    assert fragment in error_for(jsonl(row))


def test_openai_rows_with_an_empty_answer_or_the_same_answers_are_aggregated() -> None:
    same = [says("assistant", "4")]
    data = jsonl(openai_pair(), openai_pair(preferred=[]), openai_pair(preferred=same, non_preferred=same))
    message = error_for(data)
    assert "1 row has an empty 'preferred_output' (line 2)" in message
    assert "1 row has the same answer as 'preferred_output' and 'non_preferred_output' (line 3)" in message


@pytest.mark.parametrize(
    ("columns", "fragment"),
    [
        (
            ["prompt", "chosen"],
            "there is no 'rejected' column; a preference pair needs 'chosen' and 'rejected'",
        ),
        (["messages", "rejected"], "there is no 'chosen' column"),
        (["chosen", "rejected"], "no 'prompt' or 'messages' for them to answer"),
        (
            ["input", "preferred_output"],
            "there is no 'non_preferred_output' column; OpenAI's preference format",
        ),
        (["prompt", "non_preferred_output"], "there is no 'input' column"),
    ],
)
def test_half_a_preference_pair_is_refused_not_taken_for_another_kind(
    columns: list[str], fragment: str
) -> None:
    message = error_for(csv_bytes(columns, ["x"] * len(columns)), "d.csv")
    assert message.startswith("found columns [") and fragment in message


def test_a_nested_hostile_answer_is_refused_by_the_nesting_bound() -> None:
    deep: Any = "x"
    for _ in range(100):
        deep = [deep]
    message = error_for(
        csv_bytes(
            list(openai_pair()), [json.dumps({"messages": [says("user", "hi")]}), json.dumps(deep), "[]"]
        ),
        "d.csv",
    )
    assert "row 1 (line 2): 'preferred_output': JSON nested more than 64 levels deep" in message


# --- classification --------------------------------------------------------------------------


def test_text_and_label_rows_are_a_classification_dataset() -> None:
    data = jsonl(
        labelled(split="train"),
        labelled("dull", "negative", split="train"),
        labelled("ok", "negative", split="eval"),
    )
    result = profile(data, "reviews.jsonl")
    assert result.format == "classification"
    assert result.split_counts == {"train": 2, "evaluation": 1}


def test_integer_labels_are_classes() -> None:
    assert profile(jsonl(labelled(label=0), labelled(label=1)), "d.jsonl").format == "classification"


@pytest.mark.parametrize(
    ("label", "fragment"),
    [
        (None, "1 row has no 'label' (line 2); every row needs its class"),
        ("  ", "1 row has an empty 'label' (line 2)"),
        (
            1.0,
            "1 row has a 'label' that is a number (line 2); a label is a class: a string or a whole number",
        ),
        (True, "1 row has a 'label' that is a boolean (line 2)"),
        (["a"], "1 row has a 'label' that is an array (line 2)"),
        ({"name": "a"}, "1 row has a 'label' that is an object (line 2)"),
        (-1, "1 row has an integer 'label' outside 0..2147483647 (line 2); integer classes are ids from 0"),
        (2**40, "an integer 'label' outside 0..2147483647"),
        (
            "x" * (MAX_LABEL_CHARS + 1),
            f"1 row has a 'label' longer than {MAX_LABEL_CHARS} characters (line 2)",
        ),
    ],
)
def test_bad_labels_name_rows_and_the_fix(label: Any, fragment: str) -> None:
    data = jsonl(labelled(label=0 if isinstance(label, int) else "a"), labelled(label=label), labelled())
    assert fragment in error_for(data)


def test_empty_texts_of_a_classification_file_are_counted() -> None:
    message = error_for(jsonl(labelled(), labelled(text=""), labelled(text=" ", label="negative")))
    assert message.startswith("2 rows have an empty 'text' (line 2, line 3)")


def test_a_text_that_is_not_a_string_is_refused() -> None:
    assert "line 1: 'text' must be a string, found a number" in error_for(jsonl(labelled(text=3)))


def test_a_one_class_dataset_is_refused_naming_the_label() -> None:
    message = error_for(
        jsonl(
            labelled(split="train"),
            labelled("also great", split="train"),
            labelled("meh", "negative", split="eval"),
        )
    )
    assert message.startswith(
        "every training row has label 'positive'; a classifier needs at least two classes"
    )


def test_mixed_integer_and_string_labels_are_refused() -> None:
    message = error_for(jsonl(labelled(label=1), labelled(label="1")))
    assert "the labels mix integers (such as 1) and strings (such as '1')" in message


def test_evaluation_labels_no_training_row_has_are_named() -> None:
    rows = [
        labelled(split="train"),
        labelled(label="negative", split="train"),
        labelled(label="sarcastic", split="test"),
    ]
    message = error_for(jsonl(*rows))
    assert message.startswith("evaluation rows have labels no training row has ('sarcastic')")


def test_more_distinct_labels_than_the_bound_stop_the_scan_at_the_first_one_past_it() -> None:
    data = jsonl(*(labelled(label=f"class-{n}") for n in range(MAX_LABELS + 5)))
    message = error_for(data)
    assert message.startswith(f"line {MAX_LABELS + 1}: label 'class-{MAX_LABELS}' is past the {MAX_LABELS}")


def test_label_without_text_names_the_missing_column() -> None:
    message = error_for(csv_bytes(["sentence", "label"], ["a", "b"]), "d.csv")
    assert "there is a 'label' column but no 'text' column; classification needs both" in message


# --- prompts alone (GRPO) --------------------------------------------------------------------


def test_prompts_with_extra_columns_are_a_prompt_dataset() -> None:
    result = profile(jsonl({"prompt": "2+2?", "answer": 4}, {"prompt": "3+3?", "answer": 6}), "math.jsonl")
    assert (result.format, result.columns) == ("prompt", ["prompt", "answer"])


def test_empty_prompts_are_counted_and_a_non_string_prompt_is_refused() -> None:
    message = error_for(jsonl({"prompt": "ok"}, {"prompt": ""}, {"prompt": None}, {"answer": 1}))
    assert message.startswith("3 rows have an empty 'prompt' (line 2, line 3, line 4)")
    assert "line 1: 'prompt' must be a string, found an object" in error_for(jsonl({"prompt": {"a": 1}}))


def test_capitalised_new_column_names_get_a_case_hint() -> None:
    assert "case-sensitive" in error_for(csv_bytes(["Text", "Label"], ["a", "b"]), "d.csv")
