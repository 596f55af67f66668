"""Several serving replicas of one base model behind the proxy, all real `tuneforge serve` processes.

Requests are routed by tenant and adapter: while both replicas are healthy each adapter is loaded on
exactly one of them (the one `supervision.routing` ranks first); once one is killed, every request
still succeeds (a connect failure is retried once on the other) and lands on the survivor.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from live_server import LiveServer
from tests_support import assert_error, process_alive
from tuneforge import Tuneforge
from version_artifacts import peft_adapter

from app.supervision import routing
from app.supervision.serving_processes import settings_environment

pytestmark = pytest.mark.e2e

TINY = "tiny-random-llama"
TENANT = "replicated"
PROMPT = "The quick brown fox"
PER_REPLICA = 3  # adapters the routing sends to each replica


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _serve(settings: Any, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "tuneforge.cli", "serve", "--base-model", TINY, "--port", str(port)]
    with log_path.open("ab") as log:
        env = settings_environment(settings)
        return subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _adapters_per_replica(urls: list[str]) -> list[list[str]]:
    """Repo names whose `repo/1` routing sends to each replica, PER_REPLICA of each."""
    chosen: list[list[str]] = [[] for _ in urls]
    for n in range(200):
        repo = f"r{n}"
        first = routing.choose(routing.route_key(TENANT, f"{repo}/1"), urls, [0] * len(urls))[0]
        if len(chosen[first]) < PER_REPLICA:
            chosen[first].append(repo)
    assert all(len(repos) == PER_REPLICA for repos in chosen)
    return chosen


@pytest.fixture
def replicas(
    stack_settings_factory: Callable[..., Any], shared_model_cache: Path, tmp_path: Path
) -> Iterator[tuple[Any, list[str], list[subprocess.Popen[bytes]]]]:
    urls = [f"http://127.0.0.1:{_free_port()}" for _ in range(2)]
    settings = stack_settings_factory(
        "embedded", model_cache_dir=shared_model_cache, serving_urls={TINY: urls}
    )
    processes = [
        _serve(settings, int(url.rsplit(":", 1)[1]), tmp_path / f"serve{i}.log") for i, url in enumerate(urls)
    ]
    try:
        yield settings, urls, processes
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _loaded(server: LiveServer, url: str) -> set[str]:
    """The tenant's adapters in memory on one replica, asked of the replica itself."""
    signed = server.app.state.serving.signed_headers(TENANT, "GET", url + "/v1/models")
    models = httpx.get(url + "/v1/models", headers=signed, timeout=30)
    assert models.status_code == 200, models.text
    return {m["id"] for m in models.json()["data"] if m.get("parent") and m.get("loaded")}


def _ask(server: LiveServer, token: str, adapter: str, openai: bool) -> None:
    """One generation for `adapter` through the proxy, LoRAX's or OpenAI's way."""
    base = f"{server.url}/{TENANT}/deployments/v2/llms/served"
    if openai:
        url, body = base + "/v1/completions", {"model": adapter, "prompt": PROMPT, "max_tokens": 2}
    else:
        url, body = (
            base + "/generate",
            {"inputs": PROMPT, "parameters": {"adapter_id": adapter, "max_new_tokens": 2}},
        )
    response = httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=120)
    assert response.status_code == 200, response.text


def test_each_adapter_meets_one_replica_and_a_killed_replica_loses_no_request(
    replicas: tuple[Any, list[str], list[subprocess.Popen[bytes]]],
    shared_model_cache: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from worker.training.base_models import resolve_base_model

    settings, urls, processes = replicas
    plan = _adapters_per_replica(urls)
    adapter = peft_adapter(resolve_base_model(TINY, shared_model_cache), tmp_path / "adapter")
    with LiveServer(settings) as server:
        token = server.mint_token(TENANT)
        client = Tuneforge(api_token=token, base_url=server.url)
        for repo in [repo for repos in plan for repo in repos]:
            client.adapters.upload(adapter, repo=repo)
        too_many = httpx.post(
            f"{server.url}/v2/deployments",
            json={"name": "wide", "config": {"baseModel": TINY, "maxReplicas": 3}},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert_error(too_many, 422, "the operator runs 2")
        client.deployments.create("served", config={"baseModel": TINY, "maxReplicas": 2}, timeout=180)
        serving = server.app.state.serving
        _wait_until(lambda: len(serving.ready_urls(TINY)) == 2, "both replicas never became ready")
        assert client.deployments.get("served").current_replicas == 2

        adapters = [f"{repo}/1" for repos in plan for repo in repos]
        for round_ in range(2):
            for n, name in enumerate(adapters):
                _ask(server, token, name, openai=(n + round_) % 2 == 0)
        for index, url in enumerate(urls):
            assert _loaded(server, url) == {f"{repo}/1" for repo in plan[index]}, f"replica {index}"
        metrics = httpx.get(
            f"{server.url}/v2/deployments/served/metrics", headers={"Authorization": f"Bearer {token}"}
        ).json()
        assert metrics["loadedAdapters"] == sorted(adapters), "the deployment's view joins its replicas"

        # The proxy, not the health monitor, is to find the dead replica: the monitor's next pass
        # is an hour away once the pass after this change has run.
        serving.monitor_interval, passes = 3600, serving.monitor_passes
        _wait_until(lambda: serving.monitor_passes > passes, "the health monitor stopped")
        os.killpg(processes[0].pid, signal.SIGKILL)
        processes[0].wait()
        with caplog.at_level(logging.WARNING, logger="app.api.serving_proxy"):
            for name in adapters:  # replica 0's first one fails to connect and is retried on replica 1
                _ask(server, token, name, openai=False)
        retried = [r for r in caplog.records if "replica 0 unreachable" in r.getMessage()]
        assert len(retried) == 1, "one connect failure marks replica 0; the rest skip it"
        assert _loaded(server, urls[1]) == set(adapters), "every adapter now meets the survivor"
        assert client.deployments.get("served").status == "ready"
        _wait_until(lambda: serving.ready_urls(TINY) == [urls[1]], "the killed replica is never marked")
        failed = [e for e in client.deployments.events("served") if e.event_type == "Failed"]
        assert failed and failed[-1].message.startswith("replica 0:"), failed
        assert all("127.0.0.1" not in e.message for e in client.deployments.events("served"))
        client.close()


def test_a_deployment_runs_its_max_replicas_of_our_own_and_fewer_when_it_asks_for_fewer(
    stack_settings_factory: Callable[..., Any], shared_model_cache: Path
) -> None:
    settings = stack_settings_factory("embedded", model_cache_dir=shared_model_cache, serving_max_replicas=2)
    with LiveServer(settings) as server:
        token = server.mint_token(TENANT)
        client = Tuneforge(api_token=token, base_url=server.url)
        wide = httpx.post(
            f"{server.url}/v2/deployments",
            json={"name": "wide", "config": {"baseModel": TINY, "maxReplicas": 3}},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert_error(wide, 422, "config.maxReplicas: at most 2")
        client.deployments.create("pair", config={"baseModel": TINY, "maxReplicas": 2}, timeout=180)
        serving = server.app.state.serving
        _wait_until(lambda: len(serving.ready_urls(TINY)) == 2, "the second replica never became ready")
        pids = [serving.pid(TINY, 0), serving.pid(TINY, 1)]
        assert None not in pids and pids[0] != pids[1]
        assert client.deployments.get("pair").current_replicas == 2

        client.deployments.update("pair", config={"maxReplicas": 1})
        _wait_until(lambda: not process_alive(pids[1]), "the unwanted replica was never stopped")
        assert serving.pid(TINY, 0) == pids[0], "the first replica keeps serving"
        assert client.deployments.client("pair").generate(PROMPT, max_new_tokens=2).generated_text
        assert client.deployments.get("pair").current_replicas == 1
        client.close()
