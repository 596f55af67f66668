"""The shared rules: adapter references parse strictly and round-trip, manifests say what a directory
holds, speculator configs validate naming the field and ignore unknown keys, dataset kinds and splits,
and the per-step metric fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tuneforge.rules.adapter_ref import AdapterRef, AdapterRefError
from tuneforge.rules.artifacts import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PICKLED_WEIGHTS,
    SPECULATOR_CONFIG,
    SPECULATOR_WEIGHTS,
    TRAINING_SUMMARY,
    ArtifactManifest,
)
from tuneforge.rules.datasets import Split, format_columns, kind_of_columns, split_of
from tuneforge.rules.metrics import (
    EVAL_STEP_FIELDS,
    INTEGER_FIELDS,
    STEP_METRIC_FIELDS,
    TRAIN_STEP_FIELDS,
    step_values,
)
from tuneforge.rules.names import MAX_NAME_LENGTH
from tuneforge.rules.speculator import (
    MAX_DRAFT_HEADS,
    SpeculatorArchitecture,
    SpeculatorConfig,
    SpeculatorConfigError,
)

_NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
repo_names = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(_NAME_CHARS[:62]),
    st.text(_NAME_CHARS, max_size=MAX_NAME_LENGTH - 1),
).filter(lambda name: ".." not in name)
refs = st.builds(
    AdapterRef,
    repo_names,
    st.integers(1, 999_999_999),
    st.none() | st.integers(0, 999_999_999),
)


@given(refs)
def test_a_reference_round_trips_through_its_text(ref: AdapterRef) -> None:
    assert AdapterRef.parse(str(ref)) == ref
    assert str(AdapterRef.parse(str(ref))) == str(ref)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("dates/3", AdapterRef("dates", 3)),
        ("a.b-c_d/12@40", AdapterRef("a.b-c_d", 12, 40)),
        ("9/1@0", AdapterRef("9", 1, 0)),
    ],
)
def test_versions_and_checkpoints_parse(text: str, parsed: AdapterRef) -> None:
    assert AdapterRef.parse(text) == parsed
    assert AdapterRef.parse(text).version == AdapterRef(parsed.repo, parsed.number)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "dates",
        "dates/",
        "/3",
        "dates/latest",
        "dates/0",
        "dates/-1",
        "dates/3@",
        "dates/3@x",
        "dates/3@1@2",
        "dates@3",
        " dates/3",
        "dates/3\n",
        ".hidden/1",
        "a..b/1",
        "../1",
        "my repo/1",
        "a/b/1",
        "x" * (MAX_NAME_LENGTH + 1) + "/1",
        "dates/1234567890",
        "dates/1@1234567890",
    ],
)
def test_anything_else_is_refused_with_the_expected_shape(bad: str) -> None:
    with pytest.raises(AdapterRefError, match=r"repo/N@step") as caught:
        AdapterRef.parse(bad)
    assert isinstance(caught.value, ValueError) and caught.value.text == bad


def test_the_longest_name_and_numbers_are_accepted() -> None:
    longest = "x" * MAX_NAME_LENGTH + "/999999999@999999999"
    assert str(AdapterRef.parse(longest)) == longest


def test_leading_zeros_read_as_the_same_number() -> None:
    assert AdapterRef.parse("dates/03@007") == AdapterRef("dates", 3, 7)


def test_a_manifest_of_a_directory_names_its_top_level_files(tmp_path: Path) -> None:
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINING_SUMMARY, "tokenizer.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "trainer").mkdir()
    manifest = ArtifactManifest.of_directory(tmp_path)
    assert manifest.names == {ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINING_SUMMARY, "tokenizer.json"}
    assert manifest.has_lora and manifest.has_summary
    assert not manifest.has_speculator and not manifest.is_speculator_only
    assert manifest.servable() == (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
    assert ArtifactManifest.of_directory(tmp_path / "absent").names == frozenset()


def test_a_turbo_adapter_serves_its_lora_and_its_speculator() -> None:
    manifest = ArtifactManifest.of_names(
        [SPECULATOR_WEIGHTS, ADAPTER_WEIGHTS, SPECULATOR_CONFIG, ADAPTER_CONFIG, TRAINING_SUMMARY]
    )
    assert manifest.has_lora and manifest.has_speculator and not manifest.is_speculator_only
    assert manifest.servable() == (ADAPTER_CONFIG, ADAPTER_WEIGHTS, SPECULATOR_CONFIG, SPECULATOR_WEIGHTS)


def test_heads_alone_are_speculator_only_but_not_beside_pickled_weights() -> None:
    heads = ArtifactManifest.of_names([SPECULATOR_CONFIG, SPECULATOR_WEIGHTS])
    assert heads.is_speculator_only and not heads.has_lora
    with_pickle = ArtifactManifest.of_names([SPECULATOR_CONFIG, SPECULATOR_WEIGHTS, PICKLED_WEIGHTS])
    assert with_pickle.has_pickled_weights and not with_pickle.is_speculator_only
    half = ArtifactManifest.of_names([SPECULATOR_WEIGHTS, ADAPTER_CONFIG])
    assert not half.has_speculator and not half.has_lora and half.has_lora_config


def test_a_speculator_config_round_trips_through_its_file(tmp_path: Path) -> None:
    config = SpeculatorConfig(
        hidden_size=8, num_heads=2, architecture=SpeculatorArchitecture.EAGLE, rms_norm_eps=1e-5
    )
    config.save(tmp_path)
    raw = json.loads((tmp_path / SPECULATOR_CONFIG).read_text())
    assert raw["architecture"] == "eagle_layer" and raw["format"] == 1
    assert SpeculatorConfig.load(tmp_path) == config


def test_a_speculator_config_ignores_keys_it_does_not_know() -> None:
    parsed = SpeculatorConfig.parse({"hidden_size": 8, "from_a_newer_writer": [1, 2]})
    assert parsed == SpeculatorConfig(hidden_size=8)
    assert parsed.architecture is SpeculatorArchitecture.MEDUSA
    assert parsed.loss_weights == pytest.approx([1.0, 0.8, 0.64])


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({}, "hidden_size"),
        ({"hidden_size": 8, "num_heads": 0}, "num_heads"),
        ({"hidden_size": 8, "num_heads": MAX_DRAFT_HEADS + 1}, "num_heads"),
        ({"hidden_size": 8, "architecture": "lookahead"}, "architecture"),
        ({"hidden_size": "wide"}, "hidden_size"),
    ],
)
def test_a_bad_speculator_config_names_the_field(raw: dict[str, object], field: str) -> None:
    with pytest.raises(SpeculatorConfigError, match=rf"^{SPECULATOR_CONFIG}: {field}: "):
        SpeculatorConfig.parse(raw)


def test_a_speculator_config_must_be_an_object() -> None:
    with pytest.raises(SpeculatorConfigError, match="not a JSON object"):
        SpeculatorConfig.parse([1, 2])


@pytest.mark.parametrize(
    ("choice", "architecture"),
    [("eagle", SpeculatorArchitecture.EAGLE), ("medusa", SpeculatorArchitecture.MEDUSA)],
)
def test_the_config_choice_names_the_architecture(choice: str, architecture: SpeculatorArchitecture) -> None:
    assert SpeculatorArchitecture.of_choice(choice) is architecture


@pytest.mark.parametrize(
    ("columns", "kind"),
    [
        (["prompt", "completion", "messages"], "prompt_completion"),
        (["messages", "text"], "messages"),
        (["text", "split"], "text"),
        (["prompt", "text"], "text"),
        (["prompt"], "prompt"),
        (["prompt", "word"], "prompt"),
        (["text", "label"], "classification"),
        (["prompt", "chosen", "rejected"], "preference"),
        (["messages", "chosen", "rejected"], "preference"),
        (["input", "preferred_output", "non_preferred_output"], "preference"),
        (["chosen", "rejected"], None),
        (["label"], None),
        (["Text"], None),
    ],
)
def test_the_columns_decide_the_kind_in_precedence(columns: list[str], kind: str | None) -> None:
    assert kind_of_columns(columns) == kind


@given(st.sets(st.sampled_from(["prompt", "completion", "messages", "text", "label", "chosen",
                                  "rejected", "input", "preferred_output", "non_preferred_output",
                                  "split", "id"])))  # fmt: skip
def test_the_format_columns_are_the_columns_that_make_the_kind(columns: set[str]) -> None:
    read = format_columns(columns)
    assert read <= columns
    assert kind_of_columns(read) == kind_of_columns(columns)  # the rest of the row does not change it


@pytest.mark.parametrize(
    ("cell", "split"),
    [
        ("train", Split.TRAIN),
        (" Train ", Split.TRAIN),
        ("evaluation", Split.EVALUATION),
        ("EVAL", Split.EVALUATION),
        ("validation", Split.EVALUATION),
        ("test", Split.EVALUATION),
        ("dev", None),
        (1, None),
        (None, None),
    ],
)
def test_split_spellings(cell: object, split: Split | None) -> None:
    assert split_of(cell) is split


def test_step_values_take_the_named_fields_and_store_counts_as_integers() -> None:
    reported = {"train_loss": 1.5, "tokens": 128.0, "peak_rss_bytes": 4096.0, "unrelated": 3.0}
    values = step_values(reported, TRAIN_STEP_FIELDS)
    assert set(values) == set(TRAIN_STEP_FIELDS)
    assert values["train_loss"] == 1.5 and values["grad_norm"] is None
    assert values["tokens"] == 128 and isinstance(values["tokens"], int)
    assert values["peak_rss_bytes"] == 4096 and isinstance(values["peak_rss_bytes"], int)


def test_every_step_metric_field_is_named_once() -> None:
    assert len(set(STEP_METRIC_FIELDS)) == len(STEP_METRIC_FIELDS)
    assert set(EVAL_STEP_FIELDS) <= set(STEP_METRIC_FIELDS) and set(STEP_METRIC_FIELDS) >= INTEGER_FIELDS
