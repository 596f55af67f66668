"""Where a base model name is found (built in, store, HF cache, operator directory) and the config the
adapter upload checks read from each."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from model_dirs import lay_out_hf_cache

from app.context import AppContext
from app.errors import InvalidInputError
from app.services import base_models, model_store

CACHED = "acme/cached-llama"


@pytest.fixture
def ctx(
    stack_settings_factory: Callable[..., Any], tiny_llama_dir: tuple[Path, int], tmp_path: Path
) -> Iterator[AppContext]:
    lay_out_hf_cache(tmp_path / "hub", CACHED, tiny_llama_dir[0], "c" * 40)
    settings = stack_settings_factory(
        "embedded", hf_hub_cache=tmp_path / "hub", extra_base_models=[str(tiny_llama_dir[0]), "/not/here"]
    )
    context = AppContext.from_settings(settings)
    yield context
    context.close()


def test_each_kind_of_available_model_is_found_with_its_config(
    ctx: AppContext, tiny_llama_dir: tuple[Path, int], tiny_gpt2_dir: tuple[Path, int]
) -> None:
    expected = json.loads((tiny_llama_dir[0] / "config.json").read_text())
    with ctx.sessions() as session:
        model_store.import_directory(ctx.store, session, ctx.settings, tiny_llama_dir[0], "avail-llama")
        for name, source in [
            ("avail-llama", "store"),
            (CACHED, "hf-cache"),
            (str(tiny_llama_dir[0]), "local"),
        ]:
            found = base_models.require_available(ctx.settings, session, name)
            assert (found.source, found.model_type, found.context_length) == (source, "llama", 512)
            assert base_models.model_config(ctx.settings, session, name) == expected
        # A GPT-2 config has no Llama-style projections: the upload checks cannot use it.
        model_store.import_directory(ctx.store, session, ctx.settings, tiny_gpt2_dir[0], "avail-gpt2")
        assert base_models.model_config(ctx.settings, session, "avail-gpt2") is None
        for unknown in ("never-seen", "acme/other", "not a name!"):
            assert base_models.model_config(ctx.settings, session, unknown) is None


def test_an_operator_directory_this_machine_cannot_read_is_available_and_not_refused_for_serving(
    ctx: AppContext,
) -> None:
    with ctx.sessions() as session:
        found = base_models.require_available(ctx.settings, session, "/not/here", field="config.baseModel")
    assert (found.source, found.model_type) == ("local", None)
    base_models.require_servable(found)  # the serving machines may hold it; they decide


def test_the_field_named_in_the_error_is_the_callers(ctx: AppContext) -> None:
    with (
        ctx.sessions() as session,
        pytest.raises(InvalidInputError, match=r"^config\.baseModel: mistral-7b is"),
    ):
        base_models.require_available(ctx.settings, session, "mistral-7b", field="config.baseModel")
