"""`tuneforge serve --base-model vllm:smollm2-135m`, as the control plane's supervisor starts it: adapters
resolved in tuneforge storage per tenant, and the process (vLLM with it) gone once its parent is."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
from fastapi.testclient import TestClient
from tests_support import children_running
from tuneforge.serving_auth import TenantAssertions
from vllm_support import MODEL, assert_group_gone, free_port, lora, vllm_group, vllm_python, wait_healthy

from app.db.session import transaction
from app.main import create_app
from app.services import auth

# Starts the command it is given with `--parent-pid <its own pid>`, then waits to be killed.
_PARENT = """
import os, subprocess, sys, time
subprocess.Popen(sys.argv[1:] + ["--parent-pid", str(os.getpid())])
time.sleep(600)
"""


def _upload(client: TestClient, repo: str, directory: Path) -> None:
    begun = client.post("/v2/adapters/upload", json={"repo": repo}).json()
    for path in directory.iterdir():
        client.put(begun["presignedUrls"][path.name], content=path.read_bytes()).raise_for_status()
    response = client.put("/v2/adapters/upload/", json={"uploadToken": begun["uploadToken"]})
    assert response.status_code == 200, response.text


def _tenant_client(app: Any) -> tuple[str, TestClient]:
    name = f"t-{secrets.token_hex(4)}"
    with transaction(app.state.ctx.sessions) as session:
        token = auth.create_token(session, auth.get_or_create_user(session, name, "alice"))
    return name, TestClient(app, headers={"Authorization": f"Bearer {token}"})


def test_storage_adapters_are_served_per_tenant_and_the_process_follows_its_parent(
    tmp_path: Path, stack_settings_factory: Callable[..., Any]
) -> None:
    python = vllm_python()
    from worker.training.base_models import resolve_base_model

    settings = stack_settings_factory("embedded", secret_key="vllm-storage-test-" + "k" * 32)
    model_dir = resolve_base_model(MODEL, settings.model_cache_dir)
    with TestClient(create_app(settings)) as api:
        owner, owner_client = _tenant_client(api.app)
        other, _ = _tenant_client(api.app)
        _upload(owner_client, "acme", lora(model_dir, tmp_path / "acme", rank=8, seed=3))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    env |= {
        "TUNEFORGE_SECRET_KEY": settings.secret_key,
        "TUNEFORGE_MODEL_CACHE_DIR": str(settings.model_cache_dir),
    }
    env |= {"TUNEFORGE_VLLM_PYTHON": str(python), "TUNEFORGE_VLLM_DTYPE": "float32", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "tuneforge.cli", "serve", "--base-model", f"vllm:{MODEL}"]
    command += ["--port", str(port), "--data-dir", str(settings.data_dir)]
    log = tmp_path / "serve.log"
    with log.open("w") as out:  # the control plane's part: start `serve` with --parent-pid of itself
        parent = subprocess.Popen(
            [sys.executable, "-c", _PARENT, *command],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    url, assertions = f"http://127.0.0.1:{port}", TenantAssertions(settings.secret_key)

    def complete(tenant: str, model: str) -> httpx.Response:
        body = {
            "model": model,
            "prompt": "Once upon a time",
            "max_tokens": 6,
            "temperature": 0,
            "ignore_eos": True,
        }
        content = json.dumps(body).encode()
        headers = assertions.headers(tenant=tenant, method="POST", path="/v1/completions", body=content)
        headers |= {"Content-Type": "application/json"}
        return httpx.post(f"{url}/v1/completions", content=content, headers=headers, timeout=120)

    try:
        wait_healthy(url, parent, log)
        (serve,) = psutil.Process(parent.pid).children()
        base, adapted = complete(owner, MODEL), complete(owner, "acme/1")
        assert base.status_code == adapted.status_code == 200, adapted.text
        assert adapted.json()["choices"][0]["text"] != base.json()["choices"][0]["text"]
        assert complete(other, "acme/1").status_code == 404  # another tenant's adapter is not revealed
        group = vllm_group(serve.pid)
        parent.kill()  # the control plane went away: its serving processes must not outlive it
        serve.wait(timeout=60)
        assert "is gone; stopping" in log.read_text()
        assert_group_gone(group)
    finally:
        parent.kill()
        parent.wait()  # reaped: a zombie child would trip later tests that look at this process's children
        for orphan in children_running("tuneforge.cli", recursive=True):
            orphan.kill()
