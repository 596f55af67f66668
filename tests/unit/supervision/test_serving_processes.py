"""The supervisor's child environment rebuilds the control plane's own Settings, field for field."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.settings import Settings
from app.supervision.serving_processes import settings_environment


def test_a_serving_process_builds_the_same_settings_from_its_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = Settings(
        data_dir=tmp_path,
        database_url="postgresql+psycopg://u:p%40ss@db/tf",
        storage_url="s3://bucket/prefix",
        s3_endpoint_url="http://s3:9000",
        secret_key="s" * 48,
        extra_base_models=["/models/llama", "org/model"],
        serving_urls={"tiny-random-llama": "http://serve-tiny:8080"},
        model_cache_dir=tmp_path / "cache",
        serving_start_timeout_seconds=7.5,
    )
    for key in list(os.environ):
        if key.startswith("TUNEFORGE_"):
            monkeypatch.delenv(key)
    for key, value in settings_environment(parent).items():
        monkeypatch.setenv(key, value)
    assert Settings() == parent


def test_the_kv_cache_budget_reaches_tuneforge_engine_processes_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    from app.supervision import serving_replicas

    commands: list[list[str]] = []

    class Recorded:
        def __init__(self, command: list[str], **_: object) -> None:
            commands.append(command)

    monkeypatch.setattr(subprocess, "Popen", Recorded)
    sized = Settings(data_dir=tmp_path, serving_kv_cache_bytes=256 << 20)
    serving_replicas.spawn(sized, "tiny-random-llama", 0, 9000)
    serving_replicas.spawn(sized, "vllm:tiny-random-llama", 0, 9001)  # vLLM has its own knob
    serving_replicas.spawn(Settings(data_dir=tmp_path), "tiny-random-llama", 1, 9002)
    assert commands[0][commands[0].index("--kv-cache-bytes") + 1] == str(256 << 20)
    assert "--kv-cache-bytes" not in commands[1] and "--kv-cache-bytes" not in commands[2]
