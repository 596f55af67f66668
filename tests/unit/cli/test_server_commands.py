"""`tuneforge token create|list|revoke` on an embedded data dir, and `serve`'s refusal to expose the
development secret."""

from __future__ import annotations

import argparse
import os
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from tuneforge.cli import build_parser, main

from app.cli.server_parser import duration
from app.main import create_app
from app.settings import Settings


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in [n for n in os.environ if n.startswith("TUNEFORGE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("TUNEFORGE_DATA_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    ("text", "lifetime"),
    [("90m", timedelta(minutes=90)), ("12h", timedelta(hours=12)), ("30d", timedelta(days=30)),
     ("2w", timedelta(weeks=2)), ("366d", timedelta(days=366)), ("300s", timedelta(minutes=5))],
)  # fmt: skip
def test_expires_in_reads_a_duration(text: str, lifetime: timedelta) -> None:
    assert duration(text) == lifetime


@pytest.mark.parametrize("text", ["4m", "367d", "0d", "30", "1y", "-5d", "30 days", "9" * 20 + "d"])
def test_expires_in_outside_its_bounds_or_unreadable_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        duration(text)


def test_tokens_are_listed_with_state_last_use_and_expiry_then_revoked(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["token", "create", "--tenant", "acme", "--name", "ci", "--expires-in", "30d"]) == 0
    token = capsys.readouterr().out.strip()
    assert main(["token", "create", "--tenant", "other"]) == 0
    capsys.readouterr()
    with TestClient(create_app(Settings())) as api:
        assert api.get("/v2/repos", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert main(["token", "list", "--tenant", "acme"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["ID", "TENANT", "USER", "NAME", "STATE", "CREATED", "LAST", "USED", "EXPIRES"]
    lookup_id = token.removeprefix("pb_").split("_")[0]
    fields = row.split()
    assert fields[:5] == [lookup_id, "acme", "admin", "ci", "active"]
    assert len(fields) == 11, "created, last used and expiry are each a date and a time"
    assert token not in row and token.split("_")[-1] not in row, "a listing never shows the secret"

    assert main(["token", "revoke", lookup_id]) == 0
    assert main(["token", "list"]) == 0
    states = {line.split()[0]: line.split()[4] for line in capsys.readouterr().out.splitlines()[2:]}
    assert states[lookup_id] == "revoked" and len(states) == 2
    assert main(["token", "revoke", "no-such-id"]) == 1


def test_serve_refuses_a_public_address_with_the_development_secret(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--base-model", "tiny-random-llama", "--port", "1", "--host", "0.0.0.0"]) == 1
    assert "needs a real secret" in capsys.readouterr().err


def test_serve_binds_loopback_unless_told_otherwise() -> None:
    args = build_parser().parse_args(["serve", "--base-model", "tiny-random-llama", "--port", "8080"])
    assert args.host == "127.0.0.1"


def test_worker_class_of_the_worker_command_must_be_a_configured_class(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TUNEFORGE_WORKER_CLASSES", '[{"name": "a100-80", "memory_gib": 80}]')
    monkeypatch.setenv("TUNEFORGE_WORKER_CLASS", "")  # the command sets it: undone after the test
    # Refused before anything starts: a worker of an unknown class would wait on a queue nobody sends to.
    assert main(["worker", "--worker-class", "h100"]) != 0
    assert "worker_class: 'h100' is not one of worker_classes (a100-80)" in capsys.readouterr().err
