"""A tiny Llama saved as any HF model would be, and the two places a worker finds such a model: an HF
hub cache laid out as huggingface_hub writes it, and the model store (manifest + files) in a blob store."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tuneforge.rules.base_models import MANIFEST_NAME, ModelManifest, StoredFile, parse

from app.storage.base import BlobStore

HUB_ID = "some-org/some-model"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def build_tiny_llama(out_dir: Path, tokenizer_dir: Path, *, seed: int = 1) -> Path:
    """A seeded ~800K-parameter Llama in safetensors, with the tokenizer of `tokenizer_dir`."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig.from_model_config(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)
    return out_dir


def model_files(model_dir: Path) -> dict[str, Path]:
    """Every file of a model directory, by its '/'-separated path inside it."""
    return {p.relative_to(model_dir).as_posix(): p for p in sorted(model_dir.rglob("*")) if p.is_file()}


def put_in_store(store: BlobStore, name: str, model_dir: Path) -> ModelManifest:
    """The model's files under `<store_prefix>files/`, then its manifest (written last, as the
    control plane's import does)."""
    parsed = parse(name)
    files = []
    for rel, path in model_files(model_dir).items():
        data = path.read_bytes()
        store.put_stream(f"{parsed.store_prefix}files/{rel}", [data])
        files.append(StoredFile(path=rel, sha256=hashlib.sha256(data).hexdigest(), size=len(data)))
    manifest = ModelManifest(
        name=parsed.canonical,
        source="hub" if parsed.kind == "hub" else "import",
        repo_id=parsed.repo_id,
        files=files,
        config=json.loads((model_dir / "config.json").read_text()),
    )
    store.put_stream(parsed.store_prefix + MANIFEST_NAME, [manifest.model_dump_json().encode()])
    return manifest
