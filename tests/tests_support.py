"""Assertions shared by the API and end-to-end suites."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Where tests create (and drop) databases of their own on the machine's real PostgreSQL.
POSTGRES_ADMIN_DSN = os.environ.get(
    "TUNEFORGE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)
# What test configurations with PostgreSQL or S3 sign with: they refuse the development secret.
TEST_SECRET_KEY = "tuneforge-test-secret-" + "0123456789abcdef" * 2


def assert_error(response: Any, status: int, fragment: str) -> dict[str, Any]:
    """The response is a JSON error object with `status` whose `error` message mentions `fragment`."""
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text}"
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str), body
    assert fragment.lower() in body["error"].lower(), f"{fragment!r} not in {body['error']!r}"
    return body


def write_peft_adapter(directory: Path, base_model: str = "tiny-random-llama", *, rank: int = 4) -> Path:
    """A LoRA adapter in PEFT's on-disk format, written without torch (numpy + safetensors)."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "v_proj"],
    }
    (directory / "adapter_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": rng.standard_normal(
            (rank, 64), "float32"
        ),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((64, rank), "float32"),
    }
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


def write_classifier_adapter(
    directory: Path, base_model: str = "tiny-random-llama", *, rank: int = 4
) -> Path:
    """A classification adapter as the trainer writes it (a SEQ_CLS LoRA, its score head over
    tiny-random-llama's 64 hidden units, and classifier_labels.json), without torch."""
    import json

    import numpy as np
    from safetensors.numpy import load_file, save_file
    from tuneforge.rules.artifacts import CLASSIFIER_LABELS
    from tuneforge.rules.classifier import encode_labels

    write_peft_adapter(directory, base_model, rank=rank)
    config = json.loads((directory / "adapter_config.json").read_text())
    config |= {"task_type": "SEQ_CLS", "modules_to_save": ["score"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    weights = directory / "adapter_model.safetensors"
    head = np.random.default_rng(1).standard_normal((2, 64), "float32")
    save_file(load_file(str(weights)) | {"base_model.model.score.weight": head}, str(weights))
    (directory / CLASSIFIER_LABELS).write_text(encode_labels(["negative", "positive"]))
    return directory


def process_alive(pid: int) -> bool:
    """True while the process runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


@contextmanager
def ctrl_c_raises() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt inside the block, however the test run was started: a shell's
    background job inherits SIGINT ignored, and Python then installs no handler of its own."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def children_running(fragment: str, pid: int | None = None, *, recursive: bool = False) -> list[Any]:
    """Live child processes of `pid` (this process by default) whose command line holds `fragment`.

    Zombies and processes that exit while being looked at are skipped: a child another test killed and
    never waited for is still this process's child, with no command line to read.
    """
    import psutil

    found = []
    for child in psutil.Process(pid).children(recursive=recursive):
        try:
            if fragment in " ".join(child.cmdline()):
                found.append(child)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return found
