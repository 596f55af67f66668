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
from tests_support import process_alive, write_peft_adapter
from tuneforge.serving_auth import TenantAssertions

from app.settings import DEVELOPMENT_SECRET_KEY

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

    command = [sys.executable, "-m", "tuneforge.cli", "serve", "--base-model", TINY, "--port", str(port)]
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


def _serve_command(tmp_path: Path, shared_model_cache: Path, port: int) -> tuple[list[str], dict[str, str]]:
    (tmp_path / "adapters").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    env |= {"TUNEFORGE_MODEL_CACHE_DIR": str(shared_model_cache), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "tuneforge.cli", "serve", "--base-model", TINY, "--port", str(port)]
    command += ["--adapter-dir", str(tmp_path / "adapters"), "--data-dir", str(tmp_path / "data")]
    return command, env


def test_sigterm_stops_serve_within_seconds_while_a_stream_is_open(
    tmp_path: Path, shared_model_cache: Path
) -> None:
    """A client that opened a long stream and stopped reading must not hold the process up."""
    port = _free_port()
    command, env = _serve_command(tmp_path, shared_model_cache, port)
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    body = json.dumps({"inputs": "Hello", "parameters": {"max_new_tokens": 1900, "ignore_eos_token": True}})
    # The process runs with the development secret (its environment names none): sign with it.
    signed = TenantAssertions(DEVELOPMENT_SECRET_KEY).headers(
        tenant="dev", method="POST", path="/generate_stream", body=body.encode()
    )
    try:
        _wait_healthy(url, process, log)
        headers = signed | {"Content-Type": "application/json"}
        with httpx.stream(
            "POST", f"{url}/generate_stream", content=body, headers=headers, timeout=30
        ) as stream:
            next(line for line in stream.iter_lines() if line.startswith("data:"))
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=20)  # reading no further: the server may not wait on this client
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, log.read_text()


# Starts the command in argv[2:] with `--parent-pid` of its own, its output in argv[1]; prints its pid.
_LAUNCHER = """
import os, subprocess, sys, time
log = open(sys.argv[1], "w")
command = [*sys.argv[2:], "--parent-pid", str(os.getpid())]
child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_serve_exits_when_the_process_that_started_it_is_killed(
    tmp_path: Path, shared_model_cache: Path
) -> None:
    """What the control plane passes its serving processes: its SIGKILL must not leave an orphan."""
    port = _free_port()
    command, env = _serve_command(tmp_path, shared_model_cache, port)
    log = tmp_path / "serve.log"
    parent = subprocess.Popen(
        [sys.executable, "-c", _LAUNCHER, str(log), *command], env=env, stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 120
        while not _answers(f"http://127.0.0.1:{port}/health"):
            assert time.monotonic() < deadline and process_alive(child), log.read_text()
            time.sleep(0.2)
        parent.kill()  # SIGKILL: it gets no chance to stop its child
        parent.wait()
        deadline = time.monotonic() + 20
        while process_alive(child):
            assert time.monotonic() < deadline, f"serving process {child} outlived its parent"
            time.sleep(0.1)
        assert "is gone; stopping" in log.read_text()
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if process_alive(child):
            os.kill(child, signal.SIGKILL)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False
