"""Serving reads a stored speculator config by the schema training writes it with (tuneforge.rules)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tuneforge.rules.artifacts import SPECULATOR_CONFIG
from tuneforge.rules.speculator import SpeculatorArchitecture, SpeculatorConfig

from worker.serving.errors import AdapterLoadError
from worker.serving.speculator import read_speculator_config


def _stored(tmp_path: Path, config: object) -> Path:
    (tmp_path / SPECULATOR_CONFIG).write_text(json.dumps(config))
    return tmp_path


def test_a_config_training_saved_reads_back_equal(tmp_path: Path) -> None:
    saved = SpeculatorConfig(hidden_size=64, num_heads=4, architecture=SpeculatorArchitecture.EAGLE)
    saved.save(tmp_path)
    assert read_speculator_config(tmp_path) == saved


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"hidden_size": 64, "architecture": "hydra"}, "architecture"),
        ({"hidden_size": 64, "num_heads": 65}, "num_heads"),
        ({"hidden_size": 64, "num_heads": "many"}, "num_heads"),
        ({"num_heads": 3}, "hidden_size"),
    ],
)
def test_a_config_outside_the_schema_refuses_the_load_naming_its_field(
    tmp_path: Path, config: dict[str, object], field: str
) -> None:
    with pytest.raises(AdapterLoadError, match=rf"{SPECULATOR_CONFIG}: {field}"):
        read_speculator_config(_stored(tmp_path, config))


def test_a_config_that_is_not_an_object_refuses_the_load(tmp_path: Path) -> None:
    with pytest.raises(AdapterLoadError, match="not a JSON object"):
        read_speculator_config(_stored(tmp_path, [1, 2, 3]))
