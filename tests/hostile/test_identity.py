"""Hostile tenants against identity and access: a regex bomb in an uploaded adapter, direct and forged
requests to a serving process, a revoked and an expired token. One test per case of issue 15."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from live_server import LiveServer
from sqlalchemy import update
from tests_support import TEST_SECRET_KEY, assert_error, write_peft_adapter
from tuneforge.cli import main as tuneforge
from tuneforge.serving_auth import ASSERTION_HEADER, TenantAssertions

from app.db import ApiToken
from app.db.base import utcnow
from app.settings import DEVELOPMENT_SECRET_KEY
from app.supervision.serving_processes import settings_environment

TINY = "tiny-random-llama"


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _cli(server: LiveServer, monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    """`tuneforge ...` on this machine, configured like the live server (its database)."""
    for name, value in settings_environment(server.app.state.ctx.settings).items():
        if name.startswith("TUNEFORGE_"):
            monkeypatch.setenv(name, value)
    return tuneforge(list(argv))


# --- an uploaded adapter whose alpha_pattern key is a catastrophic regex ---------------------------


def test_a_catastrophic_regex_alpha_pattern_is_refused_at_upload(
    live_server: LiveServer, live_token: str, tmp_path: Path
) -> None:
    directory = write_peft_adapter(tmp_path / "bomb")
    config = json.loads((directory / "adapter_config.json").read_text())
    # peft compiles pattern keys into regexes: against a long module path this one backtracks for hours.
    config["alpha_pattern"] = {"(.+)+!": 16}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    begun = httpx.post(
        f"{live_server.url}/v2/adapters/upload", json={"repo": "bomb"}, headers=_auth(live_token)
    )
    assert begun.status_code == 200, begun.text
    urls = begun.json()["presignedUrls"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        httpx.put(urls[name], content=(directory / name).read_bytes()).raise_for_status()
    started = time.monotonic()
    finished = httpx.put(
        f"{live_server.url}/v2/adapters/upload/",
        json={"uploadToken": begun.json()["uploadToken"]},
        headers=_auth(live_token),
        timeout=30,
    )
    assert_error(finished, 422, "alpha_pattern")
    assert "regular expression" in finished.json()["error"] and time.monotonic() - started < 5
    published = httpx.get(f"{live_server.url}/v2/repos/bomb/version/1", headers=_auth(live_token))
    assert published.status_code == 404, "the refused adapter must not become a version"


# --- a serving process reached directly, around the control plane ------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def serving_process(
    shared_model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, TenantAssertions]]:
    """A real `tuneforge serve` of tiny-random-llama with one adapter, under a deployment secret."""
    root = tmp_path_factory.mktemp("identity-serving")
    write_peft_adapter(root / "adapters" / "acme" / "1")
    port, log = _free_port(), root / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    env |= {"TUNEFORGE_MODEL_CACHE_DIR": str(shared_model_cache), "TUNEFORGE_SECRET_KEY": TEST_SECRET_KEY}
    command = [sys.executable, "-m", "tuneforge.cli", "serve", "--base-model", TINY, "--port", str(port)]
    command += ["--adapter-dir", str(root / "adapters"), "--data-dir", str(root / "data")]
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env | {"PYTHONUNBUFFERED": "1"}, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url, TenantAssertions(TEST_SECRET_KEY)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)


def _refused(response: httpx.Response, fragment: str) -> None:
    """401 in the route's own error shape: OpenAI's under /v1, LoRAX's elsewhere."""
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    message = error["message"] if isinstance(error, dict) else error
    assert fragment in message, message


COMPLETION = {"model": "acme/1", "prompt": "Hello", "max_tokens": 2, "temperature": 0}


def _post(
    url: str, path: str, headers: dict[str, str], body: dict[str, object] = COMPLETION
) -> httpx.Response:
    content = json.dumps(body).encode()
    return httpx.post(
        url + path, content=content, headers=headers | {"Content-Type": "application/json"}, timeout=60
    )


def test_direct_serving_access_without_a_signature_is_401(
    serving_process: tuple[str, TenantAssertions],
) -> None:
    url, _ = serving_process
    # What the issue saw work: the port answered anyone who named a tenant in a bare header.
    for headers in ({}, {"X-Tuneforge-Tenant": "dev"}, {"X-Tuneforge-Tenant": "someone-else"}):
        _refused(_post(url, "/v1/completions", headers), "control plane signed")
        _refused(httpx.get(f"{url}/v1/models", headers=headers), "control plane signed")
        _refused(_post(url, "/generate", headers, {"inputs": "Hello"}), "control plane signed")
    assert httpx.get(f"{url}/health").status_code == 200  # probes need no signature


def test_direct_serving_access_with_a_forged_assertion_is_401(
    serving_process: tuple[str, TenantAssertions],
) -> None:
    url, genuine = serving_process
    content = json.dumps(COMPLETION).encode()

    def signed(assertions: TenantAssertions, path: str = "/v1/completions", **kw: object) -> dict[str, str]:
        return {ASSERTION_HEADER: assertions.sign(tenant="dev", method="POST", path=path, body=content, **kw)}  # type: ignore[arg-type]

    forgeries = {
        "the public development secret": signed(TenantAssertions(DEVELOPMENT_SECRET_KEY)),
        "a guessed secret": signed(TenantAssertions(secrets.token_urlsafe(32))),
        "another route's assertion": signed(genuine, path="/v1/chat/completions"),
        "an expired assertion": signed(genuine, now=time.time() - 3600),
        "garbage": {ASSERTION_HEADER: "v1.eyJ0IjoiZGV2In0.AAAA"},
    }
    for why, headers in forgeries.items():
        assert _post(url, "/v1/completions", headers).status_code == 401, why
    other_body = _post(url, "/v1/completions", signed(genuine), {**COMPLETION, "prompt": "another prompt"})
    _refused(other_body, "another request body")
    answered = _post(url, "/v1/completions", signed(genuine))
    assert answered.status_code == 200, answered.text  # the control plane's own signature works


# --- tokens -------------------------------------------------------------------------------------------


def test_a_revoked_token_is_401_at_once(live_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    token = live_server.mint_token(f"t-{secrets.token_hex(4)}")
    assert httpx.get(f"{live_server.url}/v2/repos", headers=_auth(token)).status_code == 200
    lookup_id = token.removeprefix("pb_").split("_")[0]
    assert _cli(live_server, monkeypatch, "token", "revoke", lookup_id) == 0
    assert_error(httpx.get(f"{live_server.url}/v2/repos", headers=_auth(token)), 401, "revoked")


def test_an_expired_token_is_401_at_once(live_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    tenant = f"t-{secrets.token_hex(4)}"
    token = live_server.mint_token(tenant)
    assert httpx.get(f"{live_server.url}/v2/repos", headers=_auth(token)).status_code == 200
    # The token's expiry passes (set in the past rather than waited for).
    with live_server.app.state.ctx.sessions() as session:
        lookup_id = token.removeprefix("pb_").split("_")[0]
        session.execute(
            update(ApiToken)
            .where(ApiToken.lookup_id == lookup_id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        session.commit()
    assert_error(httpx.get(f"{live_server.url}/v2/repos", headers=_auth(token)), 401, "expired")
    assert _cli(live_server, monkeypatch, "token", "list", "--tenant", tenant) == 0
