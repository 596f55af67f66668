"""`pip install ./client` alone, in a fresh venv, gives a working remote `tuneforge` command and nothing
of the server: the install a user without the server makes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests_support import write_peft_adapter
from tuneforge import Tuneforge

pytestmark = pytest.mark.e2e

CLIENT = Path(__file__).resolve().parents[3] / "client"
SERVER_PACKAGES = ("app", "worker", "fastapi", "sqlalchemy", "celery", "boto3", "torch")
# Whether each name can be imported: a name missing from the venv prints False.
IMPORTABLE = "import importlib.util, json, sys; print(json.dumps({n: importlib.util.find_spec(n) is not None for n in sys.argv[1:]}))"  # noqa: E501


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding the client distribution and its dependencies only (no system site-packages).

    pip resolves them as `make install` does, from the machine's pip configuration (its local index and
    wheel directory). The client is built from a copy, so that no build output lands in the checkout.
    """
    root = tmp_path_factory.mktemp("client-venv")
    source = shutil.copytree(CLIENT, root / "client", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60)
    # Run from the venv's own directory: the checkout on the working directory would shadow the install.
    install = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(source)]
    subprocess.run(install, check=True, cwd=root, timeout=180, env=_without_python_path())
    return venv


def _without_python_path() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _tuneforge(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in _without_python_path().items() if not k.startswith(("TUNEFORGE_", "PREDIBASE_"))}
    return subprocess.run(
        [str(venv / "bin" / "tuneforge"), *args],
        capture_output=True,
        text=True,
        cwd=venv,
        env=env,
        timeout=60,
    )


def test_the_client_alone_installs_no_server_package(client_venv: Path) -> None:
    probe = [str(client_venv / "bin" / "python"), "-c", IMPORTABLE, "tuneforge", *SERVER_PACKAGES]
    found = subprocess.run(
        probe, capture_output=True, text=True, cwd=client_venv, env=_without_python_path(), timeout=60
    )
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout) == {"tuneforge": True} | dict.fromkeys(SERVER_PACKAGES, False)


# One stack is enough: the command talks HTTP through the client, which is tested on both.
@pytest.mark.parametrize("live_server", ["embedded"], indirect=True)
def test_the_client_alone_gives_the_remote_commands(client_venv: Path, live_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    shown = _tuneforge(client_venv, "--help")
    assert shown.returncode == 0, shown.stderr
    for command in ("datasets", "repos", "adapters", "jobs", "deployments", "prompt"):
        assert command in shown.stdout
    # The server's commands come with the server distribution only.
    assert "migrate" not in shown.stdout and "{datasets," in shown.stdout
    token = live_server.mint_token("client-only")
    with Tuneforge(api_token=token, base_url=live_server.url) as client:
        client.adapters.upload(write_peft_adapter(tmp_path / "adapter"), repo="solo")
    listed = _tuneforge(client_venv, "adapters", "list", "solo", "--url", live_server.url, "--token", token)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split()[:3] == ["ADAPTER", "STATUS", "TYPE"] and row.split()[:2] == ["solo/1", "completed"]
    # Exit codes as with the server installed: 1 for a refused token, 2 for a server out of reach.
    refused = _tuneforge(client_venv, "repos", "list", "--url", live_server.url, "--token", "pb_wrong")
    assert refused.returncode == 1 and refused.stderr.startswith("tuneforge: error:"), refused.stderr
    closed = _tuneforge(client_venv, "repos", "list", "--url", "http://127.0.0.1:9", "--token", "x")
    assert closed.returncode == 2, closed.stderr
