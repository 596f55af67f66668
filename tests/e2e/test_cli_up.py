"""`tuneforge up` / `token create` / `migrate` as real processes: what a newcomer types."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from tests_support import TEST_SECRET_KEY, process_alive

TUNEFORGE = [sys.executable, "-m", "tuneforge.cli"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    return env | {"TUNEFORGE_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}


def _start_up(data_dir: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*TUNEFORGE, "up", "--port", str(port), *extra],
        env=_env(data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_healthy(url: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("tuneforge up did not become healthy within 60 s")


def _stop(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGINT)  # Ctrl-C
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    return output


def _token_from(output: str) -> str:
    line = next(line for line in output.splitlines() if "API token:" in line)
    return line.rsplit(" ", 1)[-1]


def test_up_serves_prints_a_working_dev_token_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = _start_up(tmp_path, port)
    try:
        _wait_healthy(url, process)
        token = (tmp_path / "dev-token").read_text().strip()
        me = httpx.get(f"{url}/users/current", headers={"Authorization": f"Bearer {token}"})
        assert me.status_code == 200 and me.json()["tenant"]["name"] == "dev"
        assert httpx.get(f"{url}/readyz").status_code == 200
    finally:
        output = _stop(process)
    assert _token_from(output) == token
    assert oct((tmp_path / "dev-token").stat().st_mode & 0o777) == "0o600"

    # A restart reuses the same token instead of minting a new one each time.
    process = _start_up(tmp_path, port)
    try:
        _wait_healthy(url, process)
    finally:
        assert _token_from(_stop(process)) == token


def test_token_create_prints_a_new_token_for_the_named_tenant(tmp_path: Path) -> None:
    result = subprocess.run(
        [*TUNEFORGE, "token", "create", "--tenant", "acme", "--user", "ops"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        check=True,
    )
    token = result.stdout.strip()
    assert token.startswith("pb_") and "shown only once" in result.stderr

    from app.db.session import make_engine, make_session_factory
    from app.services import auth
    from app.settings import Settings

    engine = make_engine(Settings(data_dir=tmp_path).database_url)
    with make_session_factory(engine)() as session:
        user = auth.authenticate(session, token)
        assert (user.tenant.name, user.username) == ("acme", "ops")
    engine.dispose()


def test_token_create_with_an_invalid_tenant_name_is_a_cli_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [*TUNEFORGE, "token", "create", "--tenant", "bad name"],
        env=_env(tmp_path),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "tenant: must not contain spaces" in result.stderr


def test_migrate_reports_head(tmp_path: Path) -> None:
    result = subprocess.run(
        [*TUNEFORGE, "migrate"], env=_env(tmp_path), capture_output=True, text=True, check=True
    )
    assert "database at head" in result.stdout


def test_unreachable_database_is_a_one_line_error(tmp_path: Path) -> None:
    env = _env(tmp_path) | {"TUNEFORGE_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:1/none"}
    env |= {"TUNEFORGE_SECRET_KEY": TEST_SECRET_KEY}
    result = subprocess.run([*TUNEFORGE, "migrate"], env=env, capture_output=True, text=True)
    assert result.returncode == 2
    assert "cannot reach a backing service" in result.stderr and "Traceback" not in result.stderr


def test_sigterm_stops_up_and_its_training_worker(tmp_path: Path) -> None:
    """What `kill`, systemd and the demo send: the worker must not outlive the control plane."""
    port = _free_port()
    process = _start_up(tmp_path, port)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", process)
        worker_pid = _worker_pid(process)
        validator_pid = _validate_node_of(worker_pid)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    for pid, what in ((worker_pid, "worker"), (validator_pid, "validate node")):
        deadline = time.monotonic() + 15
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not process_alive(pid), f"{what} {pid} outlived tuneforge up"


def test_up_without_a_training_worker_still_validates_datasets(tmp_path: Path) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = _start_up(tmp_path, port, "--no-worker")
    try:
        _wait_healthy(url, process)
        validator_pid = _worker_pid(process, "dataset validation worker started (pid ")
        token = (tmp_path / "dev-token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, headers=headers, timeout=30) as api:
            begun = api.post("/v2/datasets/upload", json={"fileName": "qa.csv"}).json()
            httpx.put(begun["presignedUrl"], content=b"prompt,completion\nq,a\n").raise_for_status()
            api.put("/v2/datasets/upload", json={"name": "qa", "uploadToken": begun["uploadToken"]})
            deadline = time.monotonic() + 60
            while (status := api.get("/v1/datasets/name/qa").json()["status"]) == "validating":
                assert time.monotonic() < deadline, "no dataset validation without a training worker"
                time.sleep(0.2)
        assert status == "connected"
    finally:
        output = _stop(process)
    deadline = time.monotonic() + 15
    while process_alive(validator_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_alive(validator_pid), output


def _worker_pid(process: subprocess.Popen[str], announced: str = "training worker started (pid ") -> int:
    assert process.stdout is not None
    for line in process.stdout:  # printed before uvicorn starts, so it is already there
        if announced in line:
            return int(line.split("(pid ", 1)[1].split(",", 1)[0])
    raise AssertionError("tuneforge up did not report its worker")


def _up_serving_a_deployment(tmp_path: Path, model_cache: Path) -> tuple[subprocess.Popen[str], int]:
    """`tuneforge up` (no worker) with a ready tiny deployment; returns it and its serving process's pid."""
    from tuneforge import Tuneforge

    port = _free_port()
    env = _env(tmp_path) | {
        "TUNEFORGE_MODEL_CACHE_DIR": str(model_cache),
        "TUNEFORGE_SERVING_STOP_TIMEOUT_SECONDS": "2",
    }
    process = subprocess.Popen(
        [*TUNEFORGE, "up", "--port", str(port), "--no-worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url, process)
    with Tuneforge(api_token=(tmp_path / "dev-token").read_text().strip(), base_url=url) as client:
        client.deployments.create("tiny", config={"baseModel": "tiny-random-llama"}, timeout=180)
    serving = [pid for pid in _children(process.pid) if b"serve" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(serving) == 1, serving
    return process, serving[0]


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it exited meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _wait_gone(pid: int, within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while process_alive(pid):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_sigterm_stops_up_and_its_serving_process_even_a_wedged_one(
    tmp_path: Path, shared_model_cache: Path
) -> None:
    process, serving = _up_serving_a_deployment(tmp_path, shared_model_cache)
    try:
        os.kill(serving, signal.SIGSTOP)  # wedged: alive, deaf to SIGTERM
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        _wait_gone(serving, 5, f"the wedged serving process {serving} outlived tuneforge up")
    finally:
        if process_alive(serving):
            os.kill(serving, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0


def test_a_serving_process_and_the_worker_exit_when_up_is_killed_outright(
    tmp_path: Path, shared_model_cache: Path
) -> None:
    """The issue's orphan: up killed with SIGKILL left its serving process holding the model."""
    process, serving = _up_serving_a_deployment(tmp_path, shared_model_cache)
    workers = [
        pid for pid in _children(process.pid) if b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(workers) == 1, workers  # --no-worker still validates datasets: a validate-only worker
    try:
        process.kill()
        process.wait()
        _wait_gone(serving, 20, f"serving process {serving} outlived tuneforge up")
        _wait_gone(workers[0], 20, f"worker {workers[0]} outlived tuneforge up")
    finally:
        for pid in (serving, *workers):
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)


def _validate_node_of(worker_pid: int, timeout: float = 30) -> int:
    """The `tuneforge worker --queues validate` child the training worker starts."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes()
            except OSError:
                continue
            if int(fields[1]) == worker_pid and b"validate" in cmdline:
                return int(stat.parent.name)
        time.sleep(0.1)
    raise AssertionError(f"worker {worker_pid} started no validate node")
