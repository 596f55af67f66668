"""`python -m app.demo` as `make demo` runs it: a real server process and the real client, run twice."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tests_support import TEST_SECRET_KEY

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = [sys.executable, "-m", "app.demo"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _env(data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    # The developer's own settings must not leak in: the demo runs what a newcomer would get.
    prefixes = ("TUNEFORGE_", "PREDIBASE_", "DEMO_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    # The real demo trains smollm2-135m for minutes; here the same path runs on the tiny model.
    small = {"DEMO_BASE_MODEL": "tiny-random-llama", "DEMO_TRAIN_STEPS": "4"}
    return env | small | {"TUNEFORGE_DATA_DIR": str(data_dir), "DEMO_PORT": str(port), **extra}


def _run_demo(data_dir: Path, port: int, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        DEMO,
        cwd=REPO_ROOT,
        env=_env(data_dir, port, DEMO_EXIT="1", **extra),
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data directory for the module's demo runs: the first trains, the later ones reuse its dataset
    and adapter (what a newcomer's second `make demo` does), so only the first pays for training."""
    return tmp_path_factory.mktemp("demo")


def test_demo_uploads_the_dataset_trains_an_adapter_then_a_second_run_reuses_both(demo_dir: Path) -> None:
    tmp_path = demo_dir
    port = _free_port()
    first = _run_demo(tmp_path, port)
    assert first.returncode == 0, first.stdout + first.stderr
    out = first.stdout
    assert "Dataset 'demo-dates' (uploaded)" in out
    assert "status   connected" in out and "format   prompt_completion" in out
    assert "rows     600  (train 540, evaluation 60)" in out
    assert out.count("->  ") == 3  # three preview rows
    token = (tmp_path / "dev-token").read_text().strip()
    url = f"http://127.0.0.1:{port}"
    for line in (f"{url}/docs", f"API token   {token}", f"export PREDIBASE_GATEWAY={url}"):
        assert line in out
    assert f"export PREDIBASE_API_TOKEN={token}" in out
    # The server's own output goes to the log, not the terminal.
    assert "Uvicorn running" not in out + first.stderr
    assert "Uvicorn running" in (tmp_path / "server.log").read_text()
    assert _port_is_free(port), "DEMO_EXIT=1 must stop the server"
    assert "Training a LoRA adapter on tiny-random-llama (4 steps)" in out
    assert "Adapter demo-dates/1 (trained now) on tiny-random-llama: 4 steps" in out
    losses = re.search(r"held-out eval loss: base model (\d+\.\d+), adapter (\d+\.\d+)", out)
    assert losses is not None, out
    assert "quality report: exact match: base " in out and "held-out rows" in out
    # Then it serves the adapter and shows what base model and adapter answer to held-out prompts.
    assert "Serving demo-dates/1 through deployment 'demo-tiny-random-llama'" in out
    assert out.count("\n    base      ") == 3 and out.count("\n    adapter   ") == 3
    # The live progress bar went to the terminal's stderr; it reached the last step with a loss.
    assert "4/4" in first.stderr and "train_loss=" in first.stderr and "tok/s=" in first.stderr
    # Last, after the side-by-side answers: the dashboard and its token, and the same steps in the CLI.
    closing = out[out.rindex("\n    adapter   ") :]
    assert f"Dashboard   {url}/ui\nAPI token   {token}" in closing
    assert "tuneforge prompt --deployment demo-tiny-random-llama --adapter demo-dates/1" in closing

    second = _run_demo(tmp_path, port)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Dataset 'demo-dates' (reused from an earlier run)" in second.stdout
    assert "status   connected" in second.stdout and "rows     600" in second.stdout
    assert (tmp_path / "dev-token").read_text().strip() == token
    assert "Adapter demo-dates/1 (reused from an earlier run)" in second.stdout
    assert "Training a LoRA adapter" not in second.stdout


@pytest.mark.timeout(180)
def test_ctrl_c_stops_the_server_and_exits_cleanly(demo_dir: Path) -> None:
    tmp_path = demo_dir  # after the test above: its dataset and adapter are reused, not made again
    log = tmp_path / "server.log"
    earlier = log.stat().st_size if log.exists() else 0  # the demo appends; earlier runs wrote this much
    port = _free_port()
    demo = subprocess.Popen(
        DEMO,
        cwd=REPO_ROOT,
        env=_env(tmp_path, port),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert demo.stdout is not None
        seen = []
        for line in demo.stdout:  # ends at EOF if the demo exits early
            seen.append(line)
            if "Press Ctrl-C" in line:
                break
        assert demo.poll() is None, "".join(seen)
        assert not _port_is_free(port)
        demo.send_signal(signal.SIGINT)
        rest, _ = demo.communicate(timeout=60)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 0, "".join(seen) + rest
    assert "Stopping tuneforge" in rest
    assert _port_is_free(port)
    assert "Application shutdown complete" in log.read_bytes()[earlier:].decode(errors="replace")


def test_server_that_cannot_start_fails_with_one_line_and_the_log_tail(tmp_path: Path) -> None:
    result = _run_demo(
        tmp_path,
        _free_port(),
        TUNEFORGE_DATABASE_URL="postgresql+psycopg://nobody@127.0.0.1:1/none",
        TUNEFORGE_SECRET_KEY=TEST_SECRET_KEY,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    first_line, *rest = result.stderr.splitlines()
    assert first_line.startswith("demo: error: the control plane exited with code"), result.stderr
    assert "server.log" in rest[0] and "Connection refused" in result.stderr


def test_busy_demo_port_is_refused_before_starting_anything(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        result = _run_demo(tmp_path, holder.getsockname()[1])
    assert result.returncode == 1
    assert result.stderr.strip().endswith("(DEMO_PORT) is already in use; pick another or unset DEMO_PORT")
    assert not (tmp_path / "server.log").exists()
