"""The remote commands' arguments: each group shares `--url`, `--token` and `--json`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from tuneforge.cli import remote_commands as rc
from tuneforge.config import TRAINED_ADAPTERS

if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]


def connection_options() -> argparse.ArgumentParser:
    """The options every remote command takes, as a parent parser."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--url", help="the server (default: TUNEFORGE_URL, PREDIBASE_GATEWAY, else http://127.0.0.1:8000)"
    )
    options.add_argument(
        "--token",
        help="API token (default: TUNEFORGE_API_TOKEN, PREDIBASE_API_TOKEN, else a local `tuneforge up`'s)",
    )
    options.add_argument("--json", action="store_true", help="print JSON for scripts instead of tables")
    options.add_argument(
        "--data-dir", default=argparse.SUPPRESS, help="where a local `tuneforge up` keeps its token"
    )
    return options


def add_remote_commands(commands: Commands) -> None:
    """Register `datasets`, `repos`, `adapters`, `jobs`, `deployments` and `prompt`."""
    builder = _Builder(commands)
    for add in (_datasets, _repos, _adapters, _jobs, _deployments, _prompt):
        add(builder)


class _Builder:
    """Adds command groups and their actions, each action with the shared connection options."""

    def __init__(self, commands: Commands) -> None:
        self.commands = commands
        self.common = connection_options()

    def group(self, name: str, help_text: str) -> Commands:
        return self.commands.add_parser(name, help=help_text).add_subparsers(dest="action", required=True)

    def action(
        self, parent: Commands, name: str, handler: rc.Handler, help_text: str
    ) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, help=help_text, parents=[self.common])
        parser.set_defaults(func=rc.remote(handler))
        return parser


def _datasets(b: _Builder) -> None:
    datasets = b.group("datasets", "upload and inspect datasets on a server")
    upload = b.action(
        datasets, "upload", rc.datasets_upload, "upload a CSV/JSONL/JSON/Parquet file, validate it"
    )
    upload.add_argument("file")
    upload.add_argument("--name", help="dataset name (default: the file's stem)")
    b.action(datasets, "list", rc.datasets_list, "list datasets").add_argument(
        "--limit", type=int, default=100
    )
    b.action(datasets, "show", rc.datasets_show, "status, format, rows and preview").add_argument("name")
    b.action(datasets, "rm", rc.datasets_rm, "delete a dataset and its file").add_argument("name")


def _repos(b: _Builder) -> None:
    repos = b.group("repos", "adapter repositories")
    create = b.action(repos, "create", rc.repos_create, "create a repo")
    create.add_argument("name")
    create.add_argument("--description")
    create.add_argument("--exists-ok", action="store_true", help="an existing repo of that name is fine")
    b.action(repos, "list", rc.repos_list, "list repos").add_argument("--limit", type=int, default=100)
    b.action(repos, "show", rc.repos_show, "a repo and its adapter versions").add_argument("name")
    b.action(repos, "rm", rc.repos_rm, "delete a repo, its versions and their files").add_argument("name")


def _adapters(b: _Builder) -> None:
    adapters = b.group("adapters", "train, inspect and download adapters (repo/N)")
    _add_adapters_create(b.action(adapters, "create", rc.adapters_create, "train a new adapter version"))
    b.action(adapters, "list", rc.adapters_list, "a repo's adapter versions").add_argument("repo")
    show = b.action(adapters, "show", rc.adapters_show, "one adapter version")
    show.add_argument("adapter_id", metavar="REPO/N")
    download = b.action(adapters, "download", rc.adapters_download, "download an adapter's files as a zip")
    download.add_argument("adapter_id", metavar="REPO/N")
    download.add_argument("--dest", help="file or directory (default: ./<repo>-<N>.zip)")
    export = b.action(
        adapters, "export", rc.adapters_export, "export an adapter merged into its base, as a HF model zip"
    )
    export.add_argument("adapter_id", metavar="REPO/N")
    export.add_argument(
        "--merged", action="store_true", required=True, help="merge into the base model (the only format)"
    )
    export.add_argument("--dest", help="file or directory (default: ./<repo>-<N>-merged.zip)")
    export.add_argument("--no-wait", action="store_true", help="start the export and print its status")
    export.add_argument(
        "--timeout",
        type=_wait_seconds,
        default=3600.0,
        metavar="SECONDS",
        help="how long to wait for the export (default 3600, at most 86400)",
    )
    cancel = b.action(adapters, "cancel", rc.adapters_cancel, "cancel the job training an adapter")
    cancel.add_argument("adapter_id", metavar="REPO/N")


def _jobs(b: _Builder) -> None:
    jobs = b.group("jobs", "fine-tuning jobs")
    watch = b.action(jobs, "watch", rc.jobs_watch, "follow a job with a live progress bar until it ends")
    watch.add_argument("job", metavar="JOB_UUID|REPO/N")
    b.action(jobs, "list", rc.jobs_list, "list jobs, newest first").add_argument(
        "--limit", type=int, default=100
    )


def _deployments(b: _Builder) -> None:
    deployments = b.group("deployments", "serving deployments of base models")
    deploy = b.action(deployments, "create", rc.deployments_create, "deploy a base model, wait until ready")
    deploy.add_argument("name")
    deploy.add_argument(
        "--base-model",
        required=True,
        help="a base model, or one of your adapter versions REPO/N (served merged into its base)",
    )
    deploy.add_argument("--preload", nargs="+", metavar="REPO/N", help="adapters to load at start")
    deploy.add_argument("--description")
    deploy.add_argument("--no-wait", action="store_true", help="return without waiting until it is ready")
    b.action(deployments, "list", rc.deployments_list, "list deployments")
    b.action(deployments, "rm", rc.deployments_rm, "delete a deployment").add_argument("name")


def _prompt(b: _Builder) -> None:
    prompt = b.commands.add_parser(
        "prompt", help="generate with a deployment, streaming tokens", parents=[b.common]
    )
    prompt.add_argument("text")
    prompt.add_argument("--deployment", required=True)
    prompt.add_argument(
        "--adapter", metavar="REPO/N", help="generate through this adapter (default: the base)"
    )
    prompt.add_argument("--max-new-tokens", type=int, default=64)
    prompt.add_argument("--temperature", type=float, help="sampling temperature (default: greedy)")
    prompt.set_defaults(func=rc.remote(rc.prompt))


def _add_adapters_create(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-model", help="e.g. smollm2-135m (or base_model in --config)")
    parser.add_argument("--adapter", choices=TRAINED_ADAPTERS, help="adapter type (default: lora)")
    parser.add_argument("--dataset", required=True, help="dataset name, connection/name or uuid")
    parser.add_argument("--repo", required=True, help="the repo the new version goes to (created if missing)")
    parser.add_argument(
        "--config", metavar="FILE", help="fine-tuning config fields as a YAML or JSON mapping"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any FinetuningConfig field, e.g. --set train_steps=100 --set lr_scheduler.type=cosine",
    )
    parser.add_argument("--description")
    parser.add_argument("--continue-from", metavar="REPO/N[@STEP]", help="train on from this adapter")
    parser.add_argument("--no-wait", action="store_true", help="return once the job is queued")


def _wait_seconds(value: str) -> float:
    """A wait in seconds: more than 0, at most a day."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0 < seconds <= 86400:
        raise argparse.ArgumentTypeError(f"{value}: must be more than 0 and at most 86400 seconds")
    return seconds
