"""The CLI's local parts: `--set` / `--config` parsing, tables, and where the token comes from."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from tuneforge import AuthenticationError, ValidationError
from tuneforge.cli.config_args import build_config, parse_value
from tuneforge.cli.connection import api_token, server_url
from tuneforge.cli.tables import fields, table


def test_set_values_are_json_where_they_parse_else_text() -> None:
    assert [parse_value(v) for v in ("100", "2e-4", "true", "null", '["q_proj"]', "cosine")] == [
        100,
        2e-4,
        True,
        None,
        ["q_proj"],
        "cosine",
    ]


def test_later_sources_win_and_dotted_keys_set_nested_fields(tmp_path: Path) -> None:
    config_file = tmp_path / "run.yaml"
    config_file.write_text("base_model: smollm2-135m\nepochs: 2\nlr_scheduler:\n  type: linear\n")
    config = build_config(
        str(config_file),
        {"base_model": "tiny-random-llama", "adapter": None},
        ["epochs=5", "lr_scheduler.type=cosine", "lr_scheduler.num_cycles=1"],
    )
    assert config == {
        "base_model": "tiny-random-llama",  # the flag beats the file
        "epochs": 5,  # --set beats the file
        "lr_scheduler": {"type": "cosine", "num_cycles": 1},
    }


@pytest.mark.parametrize(
    ("file_name", "text", "message"),
    [
        ("run.json", "{not json", "not valid JSON"),
        ("run.yml", "a: [1,", "not valid YAML"),
        ("run.json", "[1, 2]", "expected a mapping of config fields, got list"),
    ],
)
def test_a_bad_config_file_is_a_validation_error_naming_the_file(
    tmp_path: Path, file_name: str, text: str, message: str
) -> None:
    path = tmp_path / file_name
    path.write_text(text)
    with pytest.raises(ValidationError, match=message) as caught:
        build_config(str(path), {}, [])
    assert file_name in str(caught.value)


@pytest.mark.parametrize("assignment", ["epochs", "=3"])
def test_a_set_without_key_and_value_is_refused(assignment: str) -> None:
    with pytest.raises(ValidationError, match="--set expects key=value"):
        build_config(None, {}, [assignment])


def test_tables_align_columns_and_show_dashes_for_nothing() -> None:
    assert table(("name", "rows"), [("qa", 3), ("a-longer-name", None)]).splitlines() == [
        "NAME           ROWS",
        "qa             3",
        "a-longer-name  -",
    ]
    assert table(("name",), []) == "(none)"
    assert fields([("name", "qa"), ("error", None), ("rows", 3)]) == "name  qa\nrows  3"
    long = "x" * 100
    assert table(("text",), [(long,)]).splitlines()[1] == "x" * 59 + "…"  # tables cut long cells
    assert fields([("text", long)]) == f"text  {long}"  # a field block keeps them whole


def _args(tmp_path: Path, url: str | None = None, token: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(url=url, token=token, data_dir=str(tmp_path))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TUNEFORGE_URL", "PREDIBASE_GATEWAY", "TUNEFORGE_API_TOKEN", "PREDIBASE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("clean_env")
def test_a_local_tuneforge_ups_dev_token_is_the_default_for_a_loopback_url(tmp_path: Path) -> None:
    (tmp_path / "dev-token").write_text("pb_dev\n")
    url = server_url(_args(tmp_path))
    assert url == "http://127.0.0.1:8000"
    assert api_token(_args(tmp_path), url) == "pb_dev"
    assert api_token(_args(tmp_path, token="pb_flag"), url) == "pb_flag"


@pytest.mark.usefixtures("clean_env")
def test_the_dev_token_is_never_sent_to_another_host(tmp_path: Path) -> None:
    (tmp_path / "dev-token").write_text("pb_dev\n")
    url = server_url(_args(tmp_path, url="tuneforge.example.com:8000/v2"))
    assert url == "http://tuneforge.example.com:8000"
    with pytest.raises(AuthenticationError, match="pass --token or set TUNEFORGE_API_TOKEN"):
        api_token(_args(tmp_path), url)


def test_environment_names_of_the_client_and_the_predibase_sdk_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TUNEFORGE_URL", raising=False)
    monkeypatch.delenv("TUNEFORGE_API_TOKEN", raising=False)
    monkeypatch.setenv("PREDIBASE_GATEWAY", "http://10.0.0.5:9000")
    monkeypatch.setenv("PREDIBASE_API_TOKEN", "pb_env")
    url = server_url(_args(tmp_path))
    assert (url, api_token(_args(tmp_path), url)) == ("http://10.0.0.5:9000", "pb_env")
