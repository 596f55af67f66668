"""Small real model directories, as `save_pretrained` writes them, and Hugging Face caches laid out
around them (fixtures for every test layer). Built with transformers on the CPU in seconds; nothing is
downloaded."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest


def write_tiny_model(directory: Path, architecture: str = "llama") -> int:
    """A randomly initialised model of `architecture` (llama | gpt2) with a tokenizer; returns its numel."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        AutoModelForCausalLM,
        GPT2Config,
        LlamaConfig,
        PreTrainedTokenizerFast,
    )

    torch.manual_seed(0)
    if architecture == "llama":
        config = LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        )  # fmt: skip
    elif architecture == "gpt2":
        config = GPT2Config(
            vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=128, bos_token_id=1, eos_token_id=2
        )
    else:
        raise ValueError(f"architecture: llama or gpt2, not {architecture!r}")
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory, safe_serialization=True)
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(61)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(directory)
    # parameters() counts a tied embedding once, as the safetensors file stores it.
    return sum(p.numel() for p in model.parameters())


def lay_out_hf_cache(
    hub_cache: Path, repo_id: str, model_dir: Path, commit: str, *, ref: str = "main"
) -> Path:
    """`model_dir` as huggingface_hub caches a download: blobs by hash, a snapshot of links, a ref."""
    repo_dir = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        blob = repo_dir / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(model_dir)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A tiny Llama directory (context 512) and its parameter count; copy it before changing it."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    return directory, write_tiny_model(directory, "llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A tiny GPT-2 (an architecture tuneforge trains but does not serve) and its parameter count."""
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    return directory, write_tiny_model(directory, "gpt2")
