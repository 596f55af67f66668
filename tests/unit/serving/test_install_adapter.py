"""`LLMEngine.install_adapter`: a LoRA pushed from memory serves exactly as the same LoRA read from its
files, a second install replaces the first, and a refused one names its rule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from engine_support import Collected, make_engine
from safetensors.torch import load_file

from worker.serving.adapters import ResolvedAdapter
from worker.serving.engine import LLMEngine
from worker.serving.errors import AdapterLoadError
from worker.serving.params import SamplingParams

PROMPT = [1, 5, 9, 13, 17, 21, 25, 29]


def _greedy(engine: LLMEngine, adapter: ResolvedAdapter | str | None) -> list[int]:
    collected = Collected(engine, PROMPT, SamplingParams(max_tokens=8, temperature=0.0), adapter)  # type: ignore[arg-type]
    while engine.has_unfinished:
        engine.step()
    collected.drain()
    assert collected.error is None
    return collected.token_ids


def _files(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return config, load_file(adapter_dir / "adapter_model.safetensors")


def test_an_installed_adapter_generates_what_its_files_generate(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    engine = make_engine(tiny_model_dir, adapter_root)
    from_files = _greedy(engine, "acme/1")
    config, state = _files(adapter_root / "acme/1")
    installed = engine.install_adapter("policy", config, state)
    assert _greedy(engine, installed) == from_files
    assert _greedy(engine, None) != from_files  # the adapter changes the output at all


def test_a_second_install_replaces_the_first_and_its_cached_prefix(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    engine = make_engine(tiny_model_dir, adapter_root)
    first = engine.install_adapter("policy", *_files(adapter_root / "acme/1"))
    first_tokens = _greedy(engine, first)  # its prompt blocks are now cached under its key
    second = engine.install_adapter("policy", *_files(adapter_root / "acme/2"))
    assert second.key != first.key
    assert engine.adapters.loaded_ids().count("policy") == 1  # the first weights were dropped
    assert _greedy(engine, second) == _greedy(engine, "acme/2")
    assert _greedy(engine, second) != first_tokens


def test_an_installed_adapter_that_breaks_a_rule_is_refused_naming_it(
    tiny_model_dir: Path, adapter_root: Path
) -> None:
    engine = make_engine(tiny_model_dir, adapter_root)
    config, state = _files(adapter_root / "acme/1")
    with pytest.raises(AdapterLoadError, match="DoRA"):
        engine.install_adapter("policy", config | {"use_dora": True}, state)
    with pytest.raises(AdapterLoadError, match="not a LoRA projection"):
        engine.install_adapter("policy", config, state | {"lm_head.weight": next(iter(state.values()))})
