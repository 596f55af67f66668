"""`tuneforge models import | list | show | rm | pull` on an embedded data dir, as an operator runs them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from tuneforge.cli import EXIT_UNREACHABLE, EXIT_USER_ERROR, main

from app.cli.model_commands import human_count


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in [n for n in os.environ if n.startswith("TUNEFORGE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("TUNEFORGE_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def _rows(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}


def test_import_list_show_and_remove_a_model(
    data_dir: Path, tiny_llama_dir: tuple[Path, int], capsys: pytest.CaptureFixture[str]
) -> None:
    directory, numel = tiny_llama_dir
    assert main(["models", "import", str(directory), "--name", "my-llama"]) == 0
    assert f"stored my-llama: llama architecture, {human_count(numel)} parameters" in capsys.readouterr().out

    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == [
        "NAME",
        "SOURCE",
        "ARCHITECTURE",
        "PARAMETERS",
        "CONTEXT",
        "LENGTH",
        "SERVABLE",
    ]
    rows = _rows(out)
    assert rows["my-llama"] == ["store", "llama", human_count(numel), "512", "yes"]
    assert rows["tiny-random-llama"] == ["builtin", "llama", "3.22M", "2048", "yes"]

    assert main(["models", "show", "my-llama"]) == 0
    shown = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines() if "  " in line)
    assert shown["parameters"].strip() == str(numel) and shown["source"].strip() == "store"

    assert main(["models", "rm", "my-llama"]) == 0
    assert "removed my-llama" in capsys.readouterr().out
    assert not any((data_dir / "blobs" / "base-models").rglob("*.safetensors"))
    assert main(["models", "show", "my-llama"]) == EXIT_USER_ERROR
    assert "'my-llama' is not available on this cluster" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "code", "fragment"),
    [
        (["models", "rm", "never-imported"], EXIT_USER_ERROR, "'never-imported' is not in the model store"),
        (["models", "pull", "tiny-random-llama"], EXIT_USER_ERROR, "a built-in model; it needs no pull"),
        (
            ["models", "pull", "llama-3-1-8b-instruct"],
            EXIT_UNREACHABLE,
            "cannot reach the hub; pull on a machine",
        ),
        (
            ["models", "import", "/no/such/dir", "--name", "x"],
            EXIT_USER_ERROR,
            "/no/such/dir: not a directory",
        ),
    ],
)
def test_errors_are_one_line_for_the_operator_not_a_traceback(
    data_dir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, fragment: str
) -> None:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("tuneforge: error: ") and fragment in err and "Traceback" not in err


def test_a_pickled_model_directory_is_refused_with_how_to_convert_it(
    data_dir: Path, tiny_llama_dir: tuple[Path, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "pickled"
    shutil.copytree(tiny_llama_dir[0], directory)
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    assert main(["models", "import", str(directory), "--name", "pickled"]) == EXIT_USER_ERROR
    assert "save_pretrained(dir, safe_serialization=True)" in capsys.readouterr().err
    assert main(["models", "list"]) == 0
    assert "pickled" not in capsys.readouterr().out


def test_reimport_needs_replace(
    data_dir: Path, tiny_llama_dir: tuple[Path, int], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "import", str(tiny_llama_dir[0]), "--name", "twice"]) == 0
    assert main(["models", "import", str(tiny_llama_dir[0]), "--name", "twice"]) == EXIT_USER_ERROR
    assert "pass --replace" in capsys.readouterr().err
    assert main(["models", "import", str(tiny_llama_dir[0]), "--name", "twice", "--replace"]) == 0


@pytest.mark.parametrize(
    ("count", "text"), [(None, None), (999, "999"), (3219776, "3.22M"), (8_030_261_248, "8.03B")]
)
def test_parameter_counts_read_as_people_say_them(count: int | None, text: str | None) -> None:
    assert human_count(count) == text
