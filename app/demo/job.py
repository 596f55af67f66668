"""The `make demo` quickstart: runs the embedded stack, uploads a dataset, trains and serves a LoRA adapter.

Environment: TUNEFORGE_DATA_DIR (default ./.tuneforge), DEMO_PORT (default 8000, or a free port
when 8000 is taken), DEMO_EXIT=1 to stop the server and exit once the report is printed,
DEMO_BASE_MODEL (default smollm2-135m) and DEMO_TRAIN_STEPS (default 30) to shape the training.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

import httpx
from tuneforge import AdapterVersion, Dataset, FinetuningConfig, NotFoundError, Tuneforge, TuneforgeError
from tuneforge.cli.adapter_report import answer_rows

from app.demo import serving as demo_serving
from app.demo.dataset import write_demo_dataset
from app.settings import Settings

DEFAULT_PORT = 8000
HOST = "127.0.0.1"
DATASET_NAME = "demo-dates"
START_TIMEOUT_S = 90.0  # the first start runs every migration on a fresh database
STOP_TIMEOUT_S = 15.0
LOG_TAIL_LINES = 25
PREVIEW_ROWS = 3
DEMO_REPO = "demo-dates"
DEFAULT_BASE_MODEL = "smollm2-135m"
# Exact match on held-out rows (base model: 0%): 88% after 30 steps, 90% after 40 (bench/turbo_speedup.py's
# LoRA), 98-100% after 60. 40, not 60: a step of smollm2-135m is slow on a small CPU, and a fresh-machine
# `make demo` (install included) should end well under 15 minutes (bench/quality.py times the training).
DEFAULT_TRAIN_STEPS = 40


class DemoError(Exception):
    """A failure the user can act on; `show_log` adds the tail of the server's log to the message."""

    def __init__(self, message: str, *, show_log: bool = False) -> None:
        super().__init__(message)
        self.show_log = show_log


@dataclass
class ControlPlane:
    """The `tuneforge up` child process, its URL and the part of server.log this run wrote."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    log_offset: int

    @classmethod
    def start(cls, data_dir: Path, port: int) -> ControlPlane:
        """Launch `python -m tuneforge.cli up` with its output appended to `<data_dir>/server.log`."""
        log_path = data_dir / "server.log"
        # Appended, not truncated: a server left running by an earlier demo may still write here.
        log: IO[bytes] = log_path.open("ab")
        log.write(f"\n=== tuneforge demo, {time.strftime('%Y-%m-%d %H:%M:%S')}, port {port} ===\n".encode())
        log.flush()
        offset = log.tell()
        env = os.environ | {"TUNEFORGE_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
        with log:
            # A session of its own: Ctrl-C reaches only this process, which then stops the server once.
            process = subprocess.Popen(
                [sys.executable, "-m", "tuneforge.cli", "up", "--host", HOST, "--port", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        return cls(process=process, url=f"http://{HOST}:{port}", log_path=log_path, log_offset=offset)

    def wait_until_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        """Return once /healthz answers; DemoError if the process exits first or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DemoError(
                    f"the control plane exited with code {self.process.returncode} while starting",
                    show_log=True,
                )
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise DemoError(
            f"the control plane did not answer {self.url}/healthz within {timeout:.0f} s", show_log=True
        )

    def stop(self) -> None:
        """Stop the server gracefully, killing it if it has not exited within STOP_TIMEOUT_S."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)  # uvicorn shuts down gracefully on SIGTERM
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines this run's server wrote to server.log."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self.log_offset)
                tail = deque(log.read().decode("utf-8", "replace").splitlines(), maxlen=lines)
        except OSError:
            return ""
        return "\n".join(tail)


def choose_port() -> int:
    """DEMO_PORT if set; else 8000 when free; else any free port."""
    requested = os.environ.get("DEMO_PORT", "").strip()
    if requested:
        if not requested.isdigit() or not 0 < int(requested) < 65536:
            raise DemoError(f"DEMO_PORT must be a port number, got {requested!r}")
        if not port_is_free(int(requested)):
            raise DemoError(
                f"port {requested} (DEMO_PORT) is already in use; pick another or unset DEMO_PORT"
            )
        return int(requested)
    if port_is_free(DEFAULT_PORT):
        return DEFAULT_PORT
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether the server could bind `port` on the loopback interface right now."""
    with socket.socket() as probe:
        # As uvicorn binds: a port in TIME_WAIT counts as free, one with a listener does not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def ensure_dataset(client: Tuneforge, path: Path) -> tuple[Dataset, bool]:
    """The demo dataset on the server: reused when an earlier run uploaded it (True), else uploaded."""
    try:
        existing = client.datasets.get(DATASET_NAME)
    except NotFoundError:
        return client.datasets.from_file(path, name=DATASET_NAME), False
    if existing.status == "connected":
        return existing, True
    if existing.status == "validating":  # an earlier run stopped mid-validation; the server resumes it
        return client.datasets.wait_until_ready(DATASET_NAME), True
    # An errored copy is unusable and holds the name: replace it.
    client.datasets.delete(DATASET_NAME)
    return client.datasets.from_file(path, name=DATASET_NAME), False


def demo_config() -> FinetuningConfig:
    """What the demo trains; DEMO_BASE_MODEL / DEMO_TRAIN_STEPS shrink it (the test suite does)."""
    steps = os.environ.get("DEMO_TRAIN_STEPS", "").strip() or str(DEFAULT_TRAIN_STEPS)
    if not steps.isdigit() or int(steps) < 1:
        raise DemoError(f"DEMO_TRAIN_STEPS must be a positive whole number, got {steps!r}")
    return FinetuningConfig(
        base_model=os.environ.get("DEMO_BASE_MODEL", "").strip() or DEFAULT_BASE_MODEL,
        adapter="lora",
        train_steps=int(steps),
        learning_rate=1e-3,
        rank=16,
        micro_batch_size=8,
        effective_batch_size=16,
        max_seq_length=128,
        checkpoint_every_n_steps=20,
    )


def ensure_adapter(
    client: Tuneforge, dataset: Dataset, config: FinetuningConfig
) -> tuple[AdapterVersion, bool]:
    """A completed demo adapter trained with `config`: reused if an earlier run made one, else trained now."""
    client.repos.create(DEMO_REPO, description="adapters trained by `make demo`", exists_ok=True)
    wanted = config.model_dump(mode="json")
    for summary in reversed(client.adapters.list(DEMO_REPO)):
        if summary.status == "completed":
            version = client.adapters.get(summary.id)
            if _trained_with(version.config, wanted):
                return version, True
    print(f"Training a LoRA adapter on {config.base_model} ({config.train_steps} steps) ...", flush=True)
    try:
        return client.adapters.create(
            config=config, dataset=dataset, repo=DEMO_REPO, description="make demo"
        ), False
    except TuneforgeError as exc:
        raise DemoError(f"training the demo adapter failed: {exc}", show_log=True) from exc


def _trained_with(used: dict[str, object], wanted: dict[str, object]) -> bool:
    """A version records the config it actually used: defaults left open (None, "auto") got resolved."""
    return all(used.get(key) == value for key, value in wanted.items() if value not in (None, "auto"))


def format_training(version: AdapterVersion, reused: bool) -> str:
    summary = version.metrics_summary
    before, after = summary.get("eval_loss_before"), summary.get("eval_loss_after")
    origin = "reused from an earlier run" if reused else "trained now"
    lines = [
        "",
        f"Adapter {version.id} ({origin}) on {version.base_model}: {summary.get('steps')} steps",
    ]
    if before is not None and after is not None:
        lines.append(f"  held-out eval loss: base model {before:.4f}, adapter {after:.4f}")
    quality = version.quality_report
    if quality.get("summary"):
        lines.append(f"  quality report: {quality['summary']}")
    for row in answer_rows(quality)[:3]:
        said = [
            f"{who} said {answer!r} ({'right' if correct else 'wrong'})"
            for who, answer, correct in (
                ("base", row.base, row.base_correct),
                ("adapter", row.adapter, row.adapter_correct),
            )
            if answer is not None
        ]
        lines.append(f"    expected {row.expected!r}: " + ", ".join(said))
    return "\n".join(lines)


def format_report(dataset: Dataset, reused: bool, url: str, token: str, log_path: Path) -> str:
    """The human summary: the dataset, where the API lives, and how to point an SDK at it."""
    splits = ", ".join(f"{name} {count}" for name, count in (dataset.split_counts or {}).items())
    origin = "reused from an earlier run" if reused else "uploaded"
    lines = [
        "",
        f"tuneforge is running at {url}",
        "",
        f"Dataset {dataset.name!r} ({origin})",
        f"  status   {dataset.status}",
        f"  format   {dataset.format}",
        f"  rows     {dataset.row_count}" + (f"  ({splits})" if splits else ""),
        "  preview",
        *(f"    {_preview_line(row)}" for row in (dataset.preview or [])[:PREVIEW_ROWS]),
        "",
        f"API docs    {url}/docs",
        f"API token   {token}",
        "",
        "Point the Predibase SDK (or the tuneforge client) at this server:",
        f"  export PREDIBASE_GATEWAY={url}",
        f"  export PREDIBASE_API_TOKEN={token}",
        "",
        f"Server log: {_display(log_path)}",
    ]
    return "\n".join(lines)


def format_next_steps(url: str, token: str, deployment: str, adapter_id: str) -> str:
    """The closing lines: where the dashboard is, the token it asks for, and the same steps from a shell."""
    return "\n".join(
        [
            "",
            f"Dashboard   {url}/ui",
            f"API token   {token}",
            "",
            "The same from a shell, with the tuneforge CLI:",
            f"  export TUNEFORGE_URL={url} TUNEFORGE_API_TOKEN={token}",
            f"  tuneforge adapters show {adapter_id}",
            f'  tuneforge prompt --deployment {deployment} --adapter {adapter_id} "<your prompt>"',
        ]
    )


def _preview_line(row: dict[str, object]) -> str:
    if "prompt" in row and "completion" in row:
        prompt = textwrap.shorten(str(row["prompt"]), width=96, placeholder=" ...")
        return f"{prompt}  ->  {row['completion']}"
    return textwrap.shorten(
        str({k: v for k, v in row.items() if k != "split"}), width=110, placeholder=" ..."
    )


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # one path for Ctrl-C and `kill`: the `finally` in run() stops the server


def run(settings: Settings) -> int:
    """Start the server, upload the dataset, report; then wait for Ctrl-C unless DEMO_EXIT is set."""
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    port = choose_port()
    server = ControlPlane.start(data_dir, port)
    print(f"Starting tuneforge on {server.url} (data dir {_display(data_dir)}) ...", flush=True)
    try:
        server.wait_until_healthy()
        token_file = settings.dev_token_file
        if not token_file.is_file():
            raise DemoError(f"the server did not write its development token to {token_file}", show_log=True)
        token = token_file.read_text().strip()
        path = write_demo_dataset(data_dir / f"{DATASET_NAME}.jsonl")
        print(f"Uploading the demo dataset {_display(path)} ...", flush=True)
        config = demo_config()
        with Tuneforge(api_token=token, base_url=server.url, poll_interval=0.5) as client:
            try:
                dataset, reused = ensure_dataset(client, path)
            except TuneforgeError as exc:
                raise DemoError(f"uploading the demo dataset failed: {exc}", show_log=True) from exc
            print(format_report(dataset, reused, server.url, token, server.log_path), flush=True)
            version, reused = ensure_adapter(client, dataset, config)
            print(format_training(version, reused), flush=True)
            try:
                print(demo_serving.compare(client, version, path), flush=True)
            except demo_serving.ServingDemoError as exc:
                raise DemoError(str(exc), show_log=True) from exc
            deployment = demo_serving.deployment_for(client, version.base_model or DEFAULT_BASE_MODEL)
            print(format_next_steps(server.url, token, deployment, version.id), flush=True)
        if os.environ.get("DEMO_EXIT", "").strip().lower() in ("1", "true", "yes"):
            return 0
        print("\nPress Ctrl-C to stop the server.", flush=True)
        code = server.process.wait()
        raise DemoError(f"the control plane stopped unexpectedly (exit code {code})", show_log=True)
    except DemoError as exc:
        _fail(exc, server)
        return 1
    except KeyboardInterrupt:
        print("\nStopping tuneforge ...", flush=True)
        return 0
    finally:
        # A second Ctrl-C must not abandon the child half-stopped; stop() escalates to kill itself.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        server.stop()


def _fail(exc: DemoError, server: ControlPlane | None = None) -> None:
    print(f"demo: error: {exc}", file=sys.stderr)
    if exc.show_log and server is not None:
        tail = server.log_tail()
        print(f"--- last lines of {_display(server.log_path)} ---\n{tail}", file=sys.stderr)


def main() -> int:
    """Entry point of `python -m app.demo`; returns the process exit code."""
    # Installed for SIGINT too: a shell starts background jobs with SIGINT ignored, and the demo
    # must still stop its server when one is sent.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)
    try:
        settings = Settings()
    except ValueError as exc:  # pydantic's ValidationError included
        print(f"demo: error: invalid TUNEFORGE_* settings: {exc}", file=sys.stderr)
        return 1
    if settings.environment != "development":
        print(
            "demo: error: the demo runs the development stack; unset TUNEFORGE_ENVIRONMENT", file=sys.stderr
        )
        return 1
    try:
        return run(settings)
    except DemoError as exc:  # raised before the server started (e.g. DEMO_PORT)
        _fail(exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
