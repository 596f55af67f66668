"""`tuneforge serve` as a real process, the way the control plane starts one per deployment."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from tests_support import write_peft_adapter
from tuneforge.serving_auth import TenantAssertions

TINY = "tiny-random-llama"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_healthy(url: str, process: subprocess.Popen[str], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"tuneforge serve did not become healthy within 120 s:\n{log.read_text()}")


def test_serve_with_an_adapter_dir_answers_health_and_completions(
    tmp_path: Path, shared_model_cache: Path
) -> None:
    adapters = tmp_path / "adapters"
    write_peft_adapter(adapters / "acme" / "1")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    secret = "serve-cli-test-" + "k" * 32
    env |= {"TUNEFORGE_MODEL_CACHE_DIR": str(shared_model_cache), "PYTHONUNBUFFERED": "1"}
    env |= {"TUNEFORGE_SECRET_KEY": secret}
    assertions = TenantAssertions(secret)

    def post(path: str, body: dict[str, object]) -> httpx.Response:
        content = json.dumps(body).encode()
        signed = assertions.headers(tenant="dev", method="POST", path=path, body=content)
        headers = signed | {"Content-Type": "application/json"}
        return httpx.post(f"{url}{path}", content=content, headers=headers, timeout=60)

    command = [sys.executable, "-m", "app.cli", "serve", "--base-model", TINY, "--port", str(port)]
    command += ["--adapter-dir", str(adapters), "--data-dir", str(tmp_path / "data"), "--preload", "acme/1"]
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_healthy(url, process, log)
        body = {"model": "acme/1", "prompt": "Hello", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 401
        completion = post("/v1/completions", body)
        assert completion.status_code == 200, completion.text
        assert completion.json()["usage"]["completion_tokens"] == 5
        listing = assertions.headers(tenant="dev", method="GET", path="/v1/models")
        models = httpx.get(f"{url}/v1/models", headers=listing).json()["data"]
        assert [m["id"] for m in models] == [TINY, "acme/1"] and models[1]["loaded"] is True
        generated = post("/generate", {"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
        assert generated.status_code == 200 and "generated_text" in generated.json()
    finally:
        process.send_signal(signal.SIGINT)  # what Ctrl-C (or the supervisor's stop) does
        process.wait(timeout=30)
    assert process.returncode == 0, log.read_text()
    assert f"tuneforge serving {TINY} on {url}" in log.read_text()
