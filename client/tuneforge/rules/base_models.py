"""Base-model names both planes agree on, and where a model's weights lie outside a worker.

A job or deployment names its base model one of four ways:
- a built-in model (`smollm2-135m`, `tiny-random-llama`), built on the worker from installed files;
- a Hugging Face repo id, optionally pinned: `Qwen/Qwen2.5-7B-Instruct` or `org/name@revision`;
- a short name from Predibase's catalogue (`llama-3-1-8b-instruct`), which stands for its HF id;
- a name an operator gave a model they imported from disk (`tuneforge models import DIR --name`).

Weights that are not built in live in the model store: `<STORE_ROOT><slug>/files/<path>` in the blob
store, with a `ModelManifest` (files, sha256s, config) at `<STORE_ROOT><slug>/manifest.json`. A model
may also sit in a Hugging Face cache (`HF_HOME/hub/models--org--name/`), which a worker reads as is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, field_validator

BUILTIN_MODELS = ("smollm2-135m", "tiny-random-llama")

# Model families (HF `model_type`) tuneforge's serving engine runs; any other model can be trained
# (PEFT supports it) but a deployment of it is refused with this list.
SERVED_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3")
# Of those, the families an eagle draft layer is served on: training feeds it the raw embedding rows and
# one full-width RoPE table, which is what serving feeds it only where the model has no embedding scale
# (Gemma), a single RoPE base (Gemma3) and full-width rotary (Phi3). Elsewhere Turbo uses Medusa heads.
EAGLE_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")

# Predibase's catalogue names (docs.predibase.com, "Well-supported LLMs") and the HF repo each names.
PREDIBASE_CATALOGUE: Mapping[str, str] = {
    "llama-3-3-70b": "meta-llama/Llama-3.3-70B-Instruct",
    "llama-3-2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3-2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3-2-3b": "meta-llama/Llama-3.2-3B",
    "llama-3-2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct",
    "llama-3-1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3-1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "llama-3-1-70b-instruct": "meta-llama/Llama-3.1-70B-Instruct",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3-8b-instruct": "meta-llama/Meta-Llama-3-8B-Instruct",
    "llama-3-70b": "meta-llama/Meta-Llama-3-70B",
    "llama-3-70b-instruct": "meta-llama/Meta-Llama-3-70B-Instruct",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-7b-chat": "meta-llama/Llama-2-7b-chat-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-2-13b-chat": "meta-llama/Llama-2-13b-chat-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "llama-2-70b-chat": "meta-llama/Llama-2-70b-chat-hf",
    "codellama-7b": "codellama/CodeLlama-7b-hf",
    "codellama-7b-instruct": "codellama/CodeLlama-7b-Instruct-hf",
    "codellama-13b-instruct": "codellama/CodeLlama-13b-Instruct-hf",
    "codellama-70b-instruct": "codellama/CodeLlama-70b-Instruct-hf",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.1",
    "mistral-7b-instruct-v0-2": "mistralai/Mistral-7B-Instruct-v0.2",
    "mistral-7b-instruct-v0-3": "mistralai/Mistral-7B-Instruct-v0.3",
    "mistral-nemo-12b-2407": "mistralai/Mistral-Nemo-Base-2407",
    "mistral-nemo-12b-instruct-2407": "mistralai/Mistral-Nemo-Instruct-2407",
    "mixtral-8x7b-v0-1": "mistralai/Mixtral-8x7B-v0.1",
    "mixtral-8x7b-instruct-v0-1": "mistralai/Mixtral-8x7B-Instruct-v0.1",
    "zephyr-7b-beta": "HuggingFaceH4/zephyr-7b-beta",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "qwen3-14b": "Qwen/Qwen3-14B",
    "qwen3-32b": "Qwen/Qwen3-32B",
    "qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B",
    "qwen2-5-1-5b": "Qwen/Qwen2.5-1.5B",
    "qwen2-5-1-5b-instruct": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2-5-3b": "Qwen/Qwen2.5-3B",
    "qwen2-5-3b-instruct": "Qwen/Qwen2.5-3B-Instruct",
    "qwen2-5-7b": "Qwen/Qwen2.5-7B",
    "qwen2-5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "qwen2-5-14b": "Qwen/Qwen2.5-14B",
    "qwen2-5-14b-instruct": "Qwen/Qwen2.5-14B-Instruct",
    "qwen2-5-32b": "Qwen/Qwen2.5-32B",
    "qwen2-5-32b-instruct": "Qwen/Qwen2.5-32B-Instruct",
    "qwen2-5-coder-7b-instruct": "Qwen/Qwen2.5-Coder-7B-Instruct",
    "qwen2-5-coder-32b-instruct": "Qwen/Qwen2.5-Coder-32B-Instruct",
    "qwen2-7b": "Qwen/Qwen2-7B",
    "qwen2-7b-instruct": "Qwen/Qwen2-7B-Instruct",
    "qwen2-1-5b-instruct": "Qwen/Qwen2-1.5B-Instruct",
    "qwen2-72b-instruct": "Qwen/Qwen2-72B-Instruct",
    "gemma-2b": "google/gemma-2b",
    "gemma-2b-instruct": "google/gemma-2b-it",
    "gemma-7b": "google/gemma-7b",
    "gemma-7b-instruct": "google/gemma-7b-it",
    "gemma-2-9b": "google/gemma-2-9b",
    "gemma-2-9b-it": "google/gemma-2-9b-it",
    "gemma-2-27b": "google/gemma-2-27b",
    "gemma-2-27b-it": "google/gemma-2-27b-it",
    "gemma-3-1b-it": "google/gemma-3-1b-it",
    "gemma-3-4b-it": "google/gemma-3-4b-it",
    "gemma-3-12b-it": "google/gemma-3-12b-it",
    "gemma-3-27b-it": "google/gemma-3-27b-it",
    "phi-2": "microsoft/phi-2",
    "phi-3-mini-4k-instruct": "microsoft/Phi-3-mini-4k-instruct",
    "phi-3-mini-128k-instruct": "microsoft/Phi-3-mini-128k-instruct",
    "phi-3-5-mini-instruct": "microsoft/Phi-3.5-mini-instruct",
    "deepseek-r1-distill-qwen-32b": "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
    "smollm2-1-7b-instruct": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
}

# The blob-store directory of the model store (outside `tenants/`: models are the operator's, shared).
STORE_ROOT = "base-models/"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1

# HF's rules for a repo id (huggingface_hub.utils.validate_repo_id), plus one `@revision`.
_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_HUB_ID = re.compile(rf"^(?P<repo>{_REPO_PART}/{_REPO_PART})(?:@(?P<revision>[A-Za-z0-9._/-]{{1,100}}))?$")
# A name an operator imports a model under: like a catalogue name, no slash (a slash means a hub id).
_IMPORTED_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
MAX_NAME_LENGTH = 256

Kind = Literal["builtin", "hub", "imported"]


class BaseModelNameError(ValueError):
    """A base-model name that no rule above accepts; the message says what would be accepted."""


@dataclass(frozen=True)
class ModelName:
    """One base-model name, understood: what kind it is and the name the store keeps it under."""

    given: str  # as the user wrote it
    kind: Kind
    canonical: str  # builtin name, `org/name[@revision]` (a catalogue name maps here) or imported name
    repo_id: str | None = None
    revision: str | None = None  # None: the repo's default branch

    @property
    def store_prefix(self) -> str:
        """`base-models/<slug>/` in the blob store; the slug is reversible and a single key segment."""
        return f"{STORE_ROOT}{quote(self.canonical, safe='')}/"

    @property
    def pull_command(self) -> str:
        """What an operator runs to make this model available."""
        if self.kind == "hub":
            return f"tuneforge models pull {self.canonical}"
        return f"tuneforge models import DIR --name {self.canonical}"


def parse(name: str) -> ModelName:
    """Understand a base-model name; raise BaseModelNameError saying what is accepted otherwise."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LENGTH:
        raise BaseModelNameError(f"a base model name is 1 to {MAX_NAME_LENGTH} characters")
    if name in BUILTIN_MODELS:
        return ModelName(given=name, kind="builtin", canonical=name)
    if name in PREDIBASE_CATALOGUE:
        repo_id = PREDIBASE_CATALOGUE[name]
        return ModelName(given=name, kind="hub", canonical=repo_id, repo_id=repo_id)
    hub = _HUB_ID.match(name)
    if hub is not None and ".." not in name and not name.endswith((".", "-")):
        repo_id, revision = hub.group("repo"), hub.group("revision")
        return ModelName(given=name, kind="hub", canonical=name, repo_id=repo_id, revision=revision)
    if _IMPORTED_NAME.match(name):
        return ModelName(given=name, kind="imported", canonical=name)
    raise BaseModelNameError(
        f"{name!r} is not a base model name: use a built-in model ({', '.join(BUILTIN_MODELS)}), a "
        "Hugging Face repo id ('org/name', optionally pinned 'org/name@revision'), a Predibase catalogue "
        "name (e.g. 'llama-3-1-8b-instruct') or the name a model was imported under"
    )


def aliases(name: str) -> frozenset[str]:
    """Every name that means the same weights as `name`: a catalogue name and the hub id it stands for
    are one model, so an adapter trained on `llama-3-1-8b-instruct` serves on a deployment of
    `meta-llama/Llama-3.1-8B-Instruct`. A name no rule accepts (an operator's directory) is only itself."""
    try:
        parsed = parse(name)
    except BaseModelNameError:
        return frozenset({name})
    if parsed.kind != "hub" or parsed.revision is not None:
        return frozenset({name, parsed.canonical})
    short = {alias for alias, repo_id in PREDIBASE_CATALOGUE.items() if repo_id == parsed.canonical}
    return frozenset({name, parsed.canonical} | short)


def check_import_name(name: str) -> str:
    """A name for `models import --name`: lowercase, no slash, and not one the rules give another meaning."""
    if not _IMPORTED_NAME.match(name):
        raise BaseModelNameError(
            f"name {name!r}: 1-64 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
        )
    if name in BUILTIN_MODELS or name in PREDIBASE_CATALOGUE:
        raise BaseModelNameError(f"name {name!r} is a built-in or Predibase catalogue name; choose another")
    return name


# --- a Hugging Face cache, read as is -----------------------------------------------------------------


def hf_cache_snapshot(hub_cache: Path, repo_id: str, revision: str | None) -> Path | None:
    """The snapshot directory of `repo_id` at `revision` in an HF hub cache, if it holds a config.json.

    `hub_cache` is `HF_HUB_CACHE` (default `HF_HOME/hub`). A branch or tag resolves through
    `refs/<revision>`; a 40-hex commit names its snapshot directly.
    """
    repo_dir = hub_cache / ("models--" + repo_id.replace("/", "--"))
    ref = revision or "main"
    if _COMMIT.match(ref):
        commit = ref
    else:
        try:
            commit = (repo_dir / "refs" / ref).read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        if not _COMMIT.match(commit):
            return None
    snapshot = repo_dir / "snapshots" / commit
    return snapshot if (snapshot / "config.json").is_file() else None


# --- the model store's manifest ---------------------------------------------------------------------

# A config.json, tokenizer files and the weights' index are small; weights are counted separately.
MAX_MANIFEST_FILES = 2048


class StoredFile(BaseModel):
    """One file of a stored model, by its path inside the model directory."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    path: str = Field(min_length=1, max_length=512)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0, le=2**50)

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        parts = PurePosixPath(value).parts
        if value.startswith("/") or "\\" in value or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"path {value!r}: must be a relative path inside the model directory")
        return value


class ModelManifest(BaseModel):
    """What the store holds of one model: written last, so a model without one is not there (yet)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    format: int = MANIFEST_FORMAT
    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH)  # ModelName.canonical
    source: Literal["hub", "import"]
    repo_id: str | None = None
    revision: str | None = None  # the commit pulled, for a hub model
    files: list[StoredFile] = Field(max_length=MAX_MANIFEST_FILES)
    config: dict[str, Any]  # the model's config.json

    @property
    def model_type(self) -> str | None:
        value = self.config.get("model_type")
        return value if isinstance(value, str) else None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)
