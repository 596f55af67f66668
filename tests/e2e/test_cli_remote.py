"""The remote `tuneforge` commands against a live server with a real worker and a real serving process.

Commands run in-process through `tuneforge.cli.main` (the same code the console script runs), so their
stdout, stderr and exit codes are checked directly; one test runs the real process for exit code 2.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest
from tests_support import ctrl_c_raises, write_peft_adapter
from tuneforge import Tuneforge
from tuneforge.cli import main

pytestmark = [
    pytest.mark.e2e,
    # One stack is enough: the CLI only talks HTTP through the client, which is tested on both.
    pytest.mark.parametrize("live_server_with_worker", ["embedded"], indirect=True),
]

TINY = "tiny-random-llama"
PAIRS = [
    ("What is 2+2?", "4"),
    ("Capital of France?", "Paris"),
    ("Opposite of hot?", "cold"),
    ("Hi", "Hello"),
]


class Cli:
    """Runs `tuneforge ...` in-process against one server as one tenant."""

    def __init__(self, url: str, token: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.url, self.token, self._capsys = url, token, capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self._capsys.readouterr()  # drop anything printed before
        code = main([*argv, "--url", self.url, "--token", self.token])
        out, err = self._capsys.readouterr()
        return code, out, err

    def json(self, *argv: str) -> Any:
        code, out, err = self(*argv, "--json")
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def cli(live_server_with_worker: Any, capsys: pytest.CaptureFixture[str]) -> Cli:
    token = live_server_with_worker.mint_token(f"t-{secrets.token_hex(4)}")
    return Cli(live_server_with_worker.url, token, capsys)


@pytest.fixture
def dataset_file(tmp_path: Path) -> Path:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PAIRS * 4))
    return path


def test_datasets_upload_list_show_rm(cli: Cli, dataset_file: Path) -> None:
    code, out, err = cli("datasets", "upload", str(dataset_file), "--name", "qa")
    assert code == 0, err
    assert "status   connected" in out and "format   prompt_completion" in out and "rows     16" in out
    assert "What is 2+2?" in out  # the preview table

    code, out, _ = cli("datasets", "list")
    header, row = out.splitlines()
    assert header.split() == ["NAME", "STATUS", "FORMAT", "ROWS", "CREATED"]
    assert row.split()[:4] == ["qa", "connected", "prompt_completion", "16"]
    shown = cli.json("datasets", "show", "qa")
    assert (shown["name"], shown["row_count"], shown["split_counts"]) == ("qa", 16, {"train": 16})

    assert cli("datasets", "rm", "qa")[:2] == (0, "deleted dataset qa\n")
    assert cli.json("datasets", "list") == []
    code, out, err = cli("datasets", "show", "qa")
    assert (code, out) == (1, "")
    assert err.startswith("tuneforge: error: ") and "qa" in err and len(err.splitlines()) == 1


def test_repos_create_list_show_rm(cli: Cli) -> None:
    code, out, _ = cli("repos", "create", "acme", "--description", "first repo")
    assert code == 0 and "description  first repo" in out and "(none)" in out  # no versions yet
    assert cli("repos", "create", "acme")[0] == 1  # taken
    assert cli("repos", "create", "acme", "--exists-ok")[0] == 0
    assert [r["name"] for r in cli.json("repos", "list")] == ["acme"]
    assert cli.json("repos", "show", "acme")["description"] == "first repo"
    assert cli("repos", "rm", "acme")[:2] == (0, "deleted repo acme\n")
    code, _, err = cli("repos", "show", "acme")
    assert code == 1 and "acme" in err


def test_adapters_create_with_a_config_file_and_set_trains_with_the_progress_bar(
    cli: Cli, dataset_file: Path, tmp_path: Path
) -> None:
    assert cli("datasets", "upload", str(dataset_file), "--name", "qa")[0] == 0
    config_file = tmp_path / "run.yaml"
    config_file.write_text("train_steps: 3\nmicro_batch_size: 2\neffective_batch_size: 2\n")
    code, out, err = cli(
        *("adapters", "create", "--base-model", TINY, "--adapter", "lora", "--dataset", "qa"),
        *("--repo", "cli", "--config", str(config_file), "--set", "train_steps=4", "--set", "rank=4"),
    )
    assert code == 0, err
    assert "4/4" in err and "train_loss=" in err and "tok/s=" in err and "ETA" in err  # the live bar
    assert "adapter     cli/1" in out and "status      completed" in out and "steps       4" in out

    version = cli.json("adapters", "show", "cli/1")
    assert (version["status"], version["config"]["train_steps"], version["config"]["rank"]) == (
        "completed",
        4,
        4,
    )
    assert [v["tag"] for v in cli.json("adapters", "list", "cli")] == [1]
    job_uuid = version["finetuning_job"]["uuid"]
    code, out, _ = cli("jobs", "watch", job_uuid)  # an ended job: returns at once
    assert (code, out) == (0, f"job {job_uuid} (cli/1): completed, 4/4 steps\n")
    assert [j["uuid"] for j in cli.json("jobs", "list")] == [job_uuid]

    code, out, _ = cli("adapters", "download", "cli/1", "--dest", str(tmp_path))
    assert code == 0 and out.strip() == str(tmp_path / "cli-1.zip")
    with zipfile.ZipFile(tmp_path / "cli-1.zip") as zipped:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(zipped.namelist())


def test_an_unknown_config_field_or_dataset_exits_1_before_anything_is_created(
    cli: Cli, dataset_file: Path
) -> None:
    code, out, err = cli(
        "adapters",
        "create",
        "--base-model",
        TINY,
        "--dataset",
        "qa",
        "--repo",
        "never",
        "--set",
        "bogus_knob=1",
    )
    assert (code, out) == (1, "")
    assert err.startswith("tuneforge: error: invalid fine-tuning config: bogus_knob: unknown field")
    assert len(err.splitlines()) == 1
    assert cli("repos", "show", "never")[0] == 1  # nothing was created
    code, _, err = cli("adapters", "create", "--base-model", TINY, "--dataset", "nope", "--repo", "never")
    assert code == 1 and "nope" in err and cli("repos", "show", "never")[0] == 1
    code, _, err = cli(
        "adapters", "create", "--base-model", TINY, "--dataset", "qa", "--repo", "r", "--set", "rank"
    )
    assert code == 1 and "--set expects key=value" in err


def test_no_wait_returns_at_once_ctrl_c_detaches_cancel_ends_it_and_its_watch_exits_1(
    cli: Cli, dataset_file: Path
) -> None:
    assert cli("datasets", "upload", str(dataset_file), "--name", "qa")[0] == 0
    code, out, err = cli(
        *("adapters", "create", "--base-model", TINY, "--dataset", "qa", "--repo", "long"),
        *("--set", "train_steps=100000", "--set", "micro_batch_size=2", "--no-wait"),
    )
    assert code == 0, err
    assert out.startswith("long/1 is queued") and "tuneforge jobs watch " in out
    # Ctrl-C while watching detaches: exit 130, the job runs on, and the way back is printed.
    interrupt = threading.Timer(1.0, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    with ctrl_c_raises():
        interrupt.start()
        try:
            code, _, err = cli("jobs", "watch", "long/1")
        finally:
            interrupt.cancel()
    assert code == 130 and "keeps running" in err
    assert "tuneforge jobs watch " in err and "tuneforge adapters cancel long/1" in err
    assert cli.json("adapters", "show", "long/1")["status"] in ("queued", "training")
    code, out, _ = cli("adapters", "cancel", "long/1")
    assert code == 0 and out.startswith("long/1: job ")
    code, out, err = cli("jobs", "watch", "long/1")  # by adapter id: the job that trains it
    assert code == 1 and "canceled" in out
    assert err.strip().endswith("(long/1) was canceled")


def test_a_bad_token_exits_1_and_an_unreachable_server_exits_2(cli: Cli) -> None:
    cli.token = "pb_wrong"
    code, out, err = cli("repos", "list")
    assert (code, out) == (1, "") and "tuneforge: error:" in err and "401" in err
    unreachable = ["datasets", "list", "--url", "http://127.0.0.1:9", "--token", "x"]
    closed = subprocess.run(
        [sys.executable, "-m", "tuneforge.cli", *unreachable],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith(("TUNEFORGE_", "PREDIBASE_"))},
        timeout=60,
    )
    assert closed.returncode == 2, closed.stderr
    assert closed.stderr.startswith("tuneforge: error: could not reach http://127.0.0.1:9")
    assert len(closed.stderr.splitlines()) == 1


def test_without_a_token_a_local_servers_dev_token_is_used(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("TUNEFORGE_API_TOKEN", "PREDIBASE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "dev-token").write_text(cli.token + "\n")  # as `tuneforge up` leaves it in its data dir
    assert main(["repos", "create", "mine", "--url", cli.url, "--data-dir", str(tmp_path)]) == 0
    assert main(["repos", "list", "--url", cli.url, "--data-dir", str(tmp_path / "elsewhere")]) == 1
    assert "no API token" in capsys.readouterr().err
    assert [r["name"] for r in cli.json("repos", "list")] == ["mine"]  # created in the token's tenant


class _Writes(io.StringIO):
    """stdout that remembers each write, to tell a stream from one final print."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_deployments_create_list_prompt_streams_tokens_rm(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Tuneforge(api_token=cli.token, base_url=cli.url) as client:
        client.adapters.upload(write_peft_adapter(tmp_path / "adapter"), repo="acme")
    code, out, err = cli("deployments", "create", "tiny", "--base-model", TINY, "--description", "cli test")
    assert code == 0, err
    assert out.split("\n")[1].split()[:3] == ["tiny", TINY, "ready"]
    with Tuneforge(api_token=cli.token, base_url=cli.url) as client:
        assert client.deployments.update("tiny", description="changed").description == "changed"
    assert "changed" in [d["description"] for d in cli.json("deployments", "list") if d["name"] == "tiny"]

    prompt = ("prompt", "--deployment", "tiny", "--adapter", "acme/1", "--max-new-tokens", "8", "The quick")
    expected = cli.json(*prompt)["generated_text"]
    with Tuneforge(api_token=cli.token, base_url=cli.url) as client:  # the same, asked directly
        direct = client.deployments.client("tiny").generate(
            "The quick", adapter_id="acme/1", max_new_tokens=8
        )
    assert expected == direct.generated_text
    stdout = _Writes()
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main([*prompt, "--url", cli.url, "--token", cli.token]) == 0
    monkeypatch.undo()
    assert stdout.getvalue() == expected + "\n"
    assert len(stdout.writes) >= 8  # token by token, not one print at the end

    assert cli("deployments", "rm", "tiny")[:2] == (0, "deleted deployment tiny\n")
    assert "tiny" not in [d["name"] for d in cli.json("deployments", "list")]
