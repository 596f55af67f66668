"""What the vLLM serving tests share: the `make vllm` interpreter (required), real LoRAs of smollm2-135m,
and waiting for a `tuneforge serve` process to answer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from peft import LoraConfig, get_peft_model
from tests_support import children_running
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
MODEL = "smollm2-135m"


def vllm_python() -> Path:
    """`<repo>/.venv-vllm/bin/python`; a missing one fails the test (these tests run the real vLLM)."""
    if not VLLM_PYTHON.is_file():
        pytest.fail(f"{VLLM_PYTHON} is missing: run `make vllm` (these tests run the real vLLM)")
    return VLLM_PYTHON


def lora(
    model_dir: Path, out: Path, *, rank: int, seed: int, base_model: str = MODEL, dora: bool = False
) -> Path:
    """A PEFT LoRA (or DoRA) of the model with random B matrices, so that it changes what is generated."""
    torch.manual_seed(seed)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
        use_dora=dora, task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    model.save_pretrained(out, safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)
    config_path = out / "adapter_config.json"
    config_path.write_text(
        json.dumps(json.loads(config_path.read_text()) | {"base_model_name_or_path": base_model})
    )
    return out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_healthy(url: str, process: subprocess.Popen[str], log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-5000:]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)  # vLLM's startup has no event to await from here
    raise AssertionError(f"tuneforge serve did not become healthy:\n{log.read_text()[-5000:]}")


def vllm_group(serve_pid: int) -> int:
    """The process group of the vLLM child of a `tuneforge serve` process."""
    launcher = children_running("launch.py", serve_pid)[0]
    return os.getpgid(launcher.pid)


def assert_group_gone(group: int) -> None:
    """No process of the group is left (a zombie waiting for init counts as gone)."""
    members = [p for p in psutil.process_iter() if _group_of(p.pid) == group]
    _, alive = psutil.wait_procs(members, timeout=15)
    assert [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []


def _group_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
