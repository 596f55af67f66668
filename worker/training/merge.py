"""Owns turning a stored artifact into a standard Hugging Face model directory: a PEFT adapter (LoRA,
DoRA, the LoRA of a Turbo LoRA) merged into its base with `merge_and_unload`, or a whole model (full /
last_layer) taken as it is. What the export task stores and what a deployment of a version serves.

Pure: no database, storage or serving imports; the caller hands it local directories.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tuneforge.rules.artifacts import SPECULATOR_FILES, TRAINING_SUMMARY, ArtifactManifest

from worker.training.checkpoints import write_atomically

MODEL_CONFIG = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# Files of a whole-model artifact that are not part of the model itself.
_NOT_MODEL_FILES = frozenset((TRAINING_SUMMARY, *SPECULATOR_FILES))


class MergeError(ValueError):
    """The artifact is neither a PEFT adapter with safetensors weights nor a whole model."""


def is_whole_model(artifact_dir: Path) -> bool:
    """A full / last_layer artifact: a model config and no adapter config."""
    manifest = ArtifactManifest.of_directory(artifact_dir)
    return MODEL_CONFIG in manifest.names and not manifest.has_lora_config


def model_directory(base_dir: Path, artifact_dir: Path, out_dir: Path) -> Path:
    """Write `out_dir` (atomically: a reader never sees half of it) as a standard HF model directory:
    safetensors weights, config.json, generation_config.json and the tokenizer files. Returns `out_dir`.
    """
    manifest = ArtifactManifest.of_directory(artifact_dir)
    if is_whole_model(artifact_dir):
        write_atomically(out_dir, lambda tmp: _copy_whole_model(base_dir, artifact_dir, tmp))
    elif manifest.has_lora:
        write_atomically(out_dir, lambda tmp: _merge_adapter(base_dir, artifact_dir, tmp))
    else:
        raise MergeError(
            f"{artifact_dir.name}: holds neither a PEFT adapter (adapter_config.json + "
            "adapter_model.safetensors) nor a whole model (config.json): nothing to merge; a turbo "
            "adapter of speculator heads alone is served as an adapter of its base model"
        )
    return out_dir


@torch.no_grad()
def _merge_adapter(base_dir: Path, artifact_dir: Path, out: Path) -> None:
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # Merged in fp32 (W + scale * B @ A loses little there), then stored in the base's own dtype.
    stored_dtype = _stored_dtype(AutoConfig.from_pretrained(base_dir))
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, artifact_dir).merge_and_unload()
    merged.to(stored_dtype)
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)


def _copy_whole_model(base_dir: Path, artifact_dir: Path, out: Path) -> None:
    for path in artifact_dir.iterdir():
        if path.is_file() and path.name not in _NOT_MODEL_FILES:
            shutil.copy2(path, out / path.name)
    if not (out / TOKENIZER_CONFIG).exists():  # an artifact stored without its tokenizer: the base's
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)


def _stored_dtype(config: object) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
