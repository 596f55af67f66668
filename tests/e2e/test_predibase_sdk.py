"""The real `predibase` SDK from PyPI, pointed at a live tuneforge through PREDIBASE_GATEWAY."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from predibase import Predibase
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture
def pb(live_server, live_token: str, monkeypatch: pytest.MonkeyPatch) -> Predibase:
    monkeypatch.setenv("PREDIBASE_GATEWAY", live_server.url)
    monkeypatch.setenv("PREDIBASE_API_TOKEN", live_token)
    return Predibase()


def test_repos_create_get_list_delete(pb: Predibase) -> None:
    repo = pb.repos.create(name="sdk-repo", description="made by the SDK", exists_ok=True)
    assert repo.name == "sdk-repo" and repo.description == "made by the SDK"
    assert pb.repos.create(name="sdk-repo", exists_ok=True).uuid == repo.uuid
    assert pb.repos.get("sdk-repo").uuid == repo.uuid
    assert [r.name for r in pb.repos.list(limit=5)] == ["sdk-repo"]
    pb.repos.delete("sdk-repo")
    with pytest.raises(RuntimeError, match="not found"):
        pb.repos.get("sdk-repo")


def _write(path: Path, kind: str) -> Path:
    if kind == "csv":
        path.write_text("prompt,completion\nWhat is 2+2?,4\nCapital of Italy?,Rome\n")
    elif kind == "jsonl":
        path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    else:
        pq.write_table(pa.table({"prompt": ["x", "y"], "completion": ["1", "2"]}), path)
    return path


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_datasets_from_file_connects(pb: Predibase, tmp_path: Path, kind: str) -> None:
    dataset = pb.datasets.from_file(_write(tmp_path / f"data.{kind}", kind), name=f"ds-{kind}")
    assert dataset.status == "connected"
    assert dataset.name == f"ds-{kind}" and dataset.connection_name == "file_uploads"
    assert pb.datasets.get(f"ds-{kind}").uuid == dataset.uuid


def test_datasets_download_returns_the_uploaded_bytes(pb: Predibase, tmp_path: Path) -> None:
    source = _write(tmp_path / "data.csv", "csv")
    dataset = pb.datasets.from_file(source, name="roundtrip")
    pb.datasets.download(dataset, dest=str(tmp_path / "back"))
    assert (tmp_path / "back.csv").read_bytes() == source.read_bytes()


def test_bad_file_makes_from_file_raise_the_validation_message(pb: Predibase, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer\nq,a\n")
    with pytest.raises(ValueError, match=r"Dataset connection failed: .*found columns"):
        pb.datasets.from_file(bad, name="bad")


def _tiny_base_model(directory: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def _trained_looking_adapter(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    with torch.no_grad():  # lora_B starts at zero; make the adapter change the output
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    model.save_pretrained(adapter_dir)
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_adapters_upload_get_download_archive_delete(pb: Predibase, tmp_path: Path) -> None:
    base_dir = _tiny_base_model(tmp_path / "base")
    expected = _trained_looking_adapter(base_dir, tmp_path / "adapter")

    uploaded = pb.adapters.upload(str(tmp_path / "adapter"), "sdk-adapters")
    assert (uploaded.repo, uploaded.tag) == ("sdk-adapters", 1)
    adapter = pb.adapters.get("sdk-adapters/1")
    assert adapter.base_model == str(base_dir) and adapter.artifact_path == "sdk-adapters/1"

    pb.adapters.download("sdk-adapters/1", dest=str(tmp_path / "dl.zip"))
    with zipfile.ZipFile(io.BytesIO((tmp_path / "dl.zip").read_bytes())) as archive:
        archive.extractall(tmp_path / "unzipped")
    loaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), tmp_path / "unzipped")
    restored = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert restored.keys() == expected.keys()
    assert all(torch.equal(restored[k], expected[k]) for k in expected)

    pb.adapters.archive("sdk-adapters/1")
    assert pb.repos.get("sdk-adapters").all_versions[0].archived is True
    assert pb.repos.get("sdk-adapters").versions == []
    pb.adapters.unarchive("sdk-adapters/1")
    pb.adapters.delete("sdk-adapters/1")
    with pytest.raises(RuntimeError, match="not found"):
        pb.adapters.get("sdk-adapters/1")
