"""Continuing from an existing adapter version (`continueFromVersion`): find `repo/N` or `repo/N@step`
in the caller's tenant, check it can be trained further, and derive the new run's params from it.

The parent's recorded config is the default for every field the request leaves out, so "train
numbers/1 for 100 more steps" is `{"train_steps": 100}`. Base model and adapter type cannot change:
the parent's weights only fit the model and the method they were trained for. The one exception is
adapter `turbo`, which trains speculator heads on top of a parent's frozen LoRA (or its speculator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session
from tuneforge.config import TRAINED_ADAPTERS, FinetuningConfig
from tuneforge.rules.adapter_ref import AdapterRef, AdapterRefError

from app.db import AdapterVersion, User, VersionSource, VersionStatus
from app.errors import InvalidInputError, NotFoundError
from app.services import versions

# A parent's value of the key is not inherited when the request sets one of these fields: they
# determine it, and the parent's value would contradict the request's (its batch size, its alpha).
_DERIVED_FROM = {
    "lora_alpha": ("rank",),
    "gradient_accumulation_steps": ("effective_batch_size", "micro_batch_size"),
    "effective_batch_size": ("gradient_accumulation_steps",),
}
# Parent adapter types a `turbo` run may train heads on (their LoRA stays frozen and is republished).
_TURBO_PARENTS = ("lora", "dora", "turbo_lora", "turbo")
# PEFT adapter_config.json keys of an uploaded adapter → the config fields they fix.
_PEFT_FIELDS = {"r": "rank", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout"}


@dataclass(frozen=True)
class Parent:
    """What a new version continues from: a version, and optionally one checkpoint of its job."""

    version: AdapterVersion
    checkpoint_step: int | None

    @property
    def ref(self) -> str:
        step = f"@{self.checkpoint_step}" if self.checkpoint_step is not None else ""
        return versions.version_id(self.version) + step


def resolve(session: Session, user: User, ref: str) -> Parent:
    """`repo/N` (a completed version) or `repo/N@step` (a stored checkpoint of its job), or a 4xx."""
    try:
        parsed = AdapterRef.parse(ref.strip())
    except AdapterRefError:
        raise InvalidInputError(
            f"continueFromVersion: {ref!r} is not an adapter version; use 'repo/N' or, for a checkpoint, "
            "'repo/N@step'"
        ) from None
    try:
        found = versions.resolve(session, user.tenant.name, parsed)
    except versions.VersionNotFoundError:
        raise NotFoundError(f"continueFromVersion: adapter version {parsed.version} not found") from None
    except versions.CheckpointNotFoundError as missing:
        _check_trained(missing.version)
        raise _no_checkpoint(missing) from None
    version = found.version
    _check_trained(version)
    if found.checkpoint is not None:
        return Parent(version, found.checkpoint.step)
    if version.status != VersionStatus.COMPLETED or not version.artifact_files:
        raise InvalidInputError(
            f"continueFromVersion: {versions.version_id(version)} is {version.status}, not completed, so it "
            "has no adapter to continue from; wait for it, or continue from one of its checkpoints "
            "('repo/N@step')"
        )
    return Parent(version, None)


def _check_trained(version: AdapterVersion) -> None:
    if version.adapter_type not in TRAINED_ADAPTERS:
        raise InvalidInputError(
            f"continueFromVersion: {versions.version_id(version)} is a {version.adapter_type!r} adapter; "
            f"this release continues training only {', '.join(TRAINED_ADAPTERS)} versions"
        )


def _no_checkpoint(missing: versions.CheckpointNotFoundError) -> NotFoundError:
    name = versions.version_id(missing.version)
    if missing.uploaded:
        return NotFoundError(
            f"continueFromVersion: {name} was uploaded, not trained, so it has no checkpoints; use '{name}'"
        )
    steps = ", ".join(str(s) for s in missing.available) or "none (it has not stored one yet)"
    return NotFoundError(
        f"continueFromVersion: {name} has no checkpoint at step {missing.step}; available steps: {steps}"
    )


def params(parent: Parent, requested: dict[str, Any]) -> dict[str, Any]:
    """The request's params over the parent's config; a changed base model or adapter is a 422.

    A field sent as null counts as not set (some clients send every field), so it is inherited.
    """
    version = parent.version
    given = {key: value for key, value in requested.items() if value is not None}
    if given.get("base_model", version.base_model) != version.base_model:
        raise InvalidInputError(
            f"params.base_model: continuing from {parent.ref} (trained on {version.base_model!r}) trains "
            f"{version.base_model!r}, not {given['base_model']!r}: its weights fit only that model. Leave "
            "base_model out, or start a new adapter without continueFromVersion"
        )
    adapter = given.get("adapter", version.adapter_type)
    heads_on_parent = adapter == "turbo" and version.adapter_type in _TURBO_PARENTS
    if adapter != version.adapter_type and not heads_on_parent:
        raise InvalidInputError(
            f"params.adapter: continuing from {parent.ref} (a {version.adapter_type!r} version) trains "
            f"{version.adapter_type!r}, not {given['adapter']!r}. Leave adapter out, or start a new "
            "adapter without continueFromVersion"
        )
    inherited = _inherited_config(version)
    if adapter != version.adapter_type:
        # The parent's learning rate was chosen for its own method; heads take their adapter's default.
        inherited.pop("learning_rate", None)
    for field, determinants in _DERIVED_FROM.items():
        if any(name in given for name in determinants):
            inherited.pop(field, None)
    return inherited | given


def _inherited_config(version: AdapterVersion) -> dict[str, Any]:
    """The parent's config as FinetuningConfig fields, with its base model and adapter type."""
    config = version.config or {}
    if version.source == VersionSource.UPLOAD:
        # An uploaded adapter records PEFT's own adapter_config.json, not a training config.
        fields = {ours: config[theirs] for theirs, ours in _PEFT_FIELDS.items() if theirs in config}
        if isinstance(config.get("target_modules"), list):
            fields["target_modules"] = config["target_modules"]
    else:
        fields = {key: value for key, value in config.items() if key in FinetuningConfig.model_fields}
    return fields | {"base_model": version.base_model, "adapter": version.adapter_type}
