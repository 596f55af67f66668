"""Completed adapter versions of every kind for the export and version-model tests: artifacts written as
the trainer writes them (PEFT `save_pretrained`, or a whole model with its tokenizer), stored and recorded
the way the worker publishes them (`worker.job_io.upload_dir`, then the version row completed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from app.context import AppContext
from app.db import AdapterVersion, VersionSource, VersionStatus
from app.db.session import transaction
from app.services import auth, repos
from worker.job_io import upload_dir

TINY = "tiny-random-llama"


@dataclass(frozen=True)
class StoredVersion:
    id: str  # repo/N
    uuid: str
    row_id: int


def peft_adapter(
    base_dir: Path, out: Path, *, dora: bool = False, seed: int = 3, base_model: str = TINY
) -> Path:
    """A LoRA (or DoRA) with random B matrices (not PEFT's zeros), so that it changes what is generated."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "up_proj"],
        use_dora=dora,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.3)
    model.peft_config["default"].base_model_name_or_path = base_model
    model.save_pretrained(out, safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)
    return out


def whole_model(base_dir: Path, out: Path, *, seed: int = 5) -> Path:
    """A full fine-tune's artifact: the base with changed weights, saved with its tokenizer."""
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn_like(model.lm_head.weight))
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


def publish(
    ctx: AppContext,
    tenant: str,
    repo_name: str,
    adapter_type: str,
    artifact: Path,
    *,
    status: str = "completed",
) -> StoredVersion:
    """The repo's next version, of `adapter_type`, with `artifact` stored as its published files."""
    with transaction(ctx.sessions) as session:
        user = auth.get_or_create_user(session, tenant, "alice")
        repo = repos.create(session, user, repo_name, None, exists_ok=True)
    with transaction(ctx.sessions) as session:
        user = auth.get_or_create_user(session, tenant, "alice")
        repo = repos.get(session, user, repo_name)
        version = AdapterVersion(
            repo_id=repo.id,
            created_by_id=user.id,
            tag=repos.allocate_tag(session, repo),
            base_model=TINY,
            adapter_type=adapter_type,
            source=VersionSource.FINETUNE,
            status=status,
            config={"base_model": TINY, "adapter": adapter_type},
        )
        session.add(version)
        session.flush()
        if status == VersionStatus.COMPLETED:
            prefix = f"tenants/{user.tenant.uuid}/repos/{repo.uuid}/versions/{version.uuid}/"
            version.artifact_files = upload_dir(ctx.store, artifact, prefix)
            version.artifact_prefix = prefix
        return StoredVersion(f"{repo_name}/{version.tag}", version.uuid, version.id)


def greedy(model: torch.nn.Module, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """Hugging Face greedy decoding of `new_tokens` tokens (stopping at EOS as the engine does)."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return [int(t) for t in out[0, len(prompt_ids) :]]
