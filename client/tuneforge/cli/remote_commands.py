"""The remote commands' handlers: `datasets`, `repos`, `adapters`, `jobs`, `deployments`, `prompt`.

Each one talks to the server only through the thin client (`tuneforge.Tuneforge`), prints a table or
a `field  value` block (JSON with `--json`), and returns the exit code; failures are raised as the
client's typed errors, which `tuneforge.cli.main` turns into exit codes 1 and 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from tuneforge import Dataset, Deployment, FinetuningJob, Repo, Tuneforge
from tuneforge.adapters import parse_adapter_id
from tuneforge.cli.adapter_report import adapter_details
from tuneforge.cli.config_args import build_config
from tuneforge.cli.connection import connect
from tuneforge.cli.tables import emit, fields, table
from tuneforge.finetuning import finetuning_params

Handler = Callable[[Tuneforge, argparse.Namespace], int]


def remote(handler: Handler) -> Callable[[argparse.Namespace], int]:
    """Run `handler` with a client for the chosen server, closed afterwards."""

    def run(args: argparse.Namespace) -> int:
        with connect(args) as client:
            return handler(client, args)

    return run


def deleted(args: argparse.Namespace, kind: str) -> int:
    """Report a deletion: `deleted <kind> <name>`, or `{"deleted": name}` with `--json`."""
    return emit(args.json, {"deleted": args.name}, lambda: f"deleted {kind} {args.name}")


# --- datasets -------------------------------------------------------------------------------------


def datasets_upload(client: Tuneforge, args: argparse.Namespace) -> int:
    dataset = client.datasets.from_file(Path(args.file), name=args.name)
    return emit(args.json, dataset, lambda: dataset_details(dataset))


def datasets_list(client: Tuneforge, args: argparse.Namespace) -> int:
    found = client.datasets.list(limit=args.limit)
    rows = [(d.name, d.status, d.format, d.row_count, d.created_at) for d in found]
    return emit(args.json, found, lambda: table(("name", "status", "format", "rows", "created"), rows))


def datasets_show(client: Tuneforge, args: argparse.Namespace) -> int:
    dataset = client.datasets.get(args.name)
    return emit(args.json, dataset, lambda: dataset_details(dataset))


def datasets_rm(client: Tuneforge, args: argparse.Namespace) -> int:
    client.datasets.delete(args.name)
    return deleted(args, "dataset")


def dataset_details(dataset: Dataset) -> str:
    splits = ", ".join(f"{name} {count}" for name, count in (dataset.split_counts or {}).items())
    block = fields(
        [
            ("name", dataset.name),
            ("uuid", dataset.uuid),
            ("status", dataset.status),
            ("error", dataset.last_error),
            ("format", dataset.format),
            ("rows", dataset.row_count),
            ("splits", splits or None),
            ("file", dataset.file_name),
            ("created", dataset.created_at),
        ]
    )
    columns = [c for c in (dataset.columns or []) if c != "split"]
    preview = [[row.get(c) for c in columns] for row in (dataset.preview or [])[:3]]
    return block + ("\n\n" + table(columns, preview) if columns and preview else "")


# --- repos ------------------------------------------------------------------------------------------


def repos_create(client: Tuneforge, args: argparse.Namespace) -> int:
    repo = client.repos.create(args.name, description=args.description, exists_ok=args.exists_ok)
    return emit(args.json, repo, lambda: repo_details(repo))


def repos_list(client: Tuneforge, args: argparse.Namespace) -> int:
    found = client.repos.list(limit=args.limit)
    rows = [(r.name, len(r.versions), r.description, r.created_at) for r in found]
    return emit(args.json, found, lambda: table(("name", "versions", "description", "created"), rows))


def repos_show(client: Tuneforge, args: argparse.Namespace) -> int:
    repo = client.repos.get(args.name)
    return emit(args.json, repo, lambda: repo_details(repo))


def repos_rm(client: Tuneforge, args: argparse.Namespace) -> int:
    client.repos.delete(args.name)
    return deleted(args, "repo")


def repo_details(repo: Repo) -> str:
    block = fields(
        [
            ("name", repo.name),
            ("uuid", repo.uuid),
            ("description", repo.description),
            ("created", repo.created_at),
        ]
    )
    return f"{block}\n\n{versions_table(repo)}"


def versions_table(repo: Repo) -> str:
    rows = [(v.id, v.status, v.adapter_type, v.base_model, v.archived, v.created_at) for v in repo.versions]
    return table(("adapter", "status", "type", "base model", "archived", "created"), rows)


# --- adapters and jobs ----------------------------------------------------------------------------


def adapters_create(client: Tuneforge, args: argparse.Namespace) -> int:
    flags = {"base_model": args.base_model, "adapter": args.adapter}
    config = build_config(args.config, flags, args.set)
    # Config and dataset are checked before the repo is created, so a mistake leaves no empty repo behind.
    finetuning_params(config, continuing=args.continue_from is not None)
    client.datasets.get(args.dataset)
    client.repos.create(args.repo, exists_ok=True)
    version = client.adapters.create(
        config=config,
        dataset=args.dataset,
        repo=args.repo,
        description=args.description,
        continue_from_version=args.continue_from,
        wait=not args.no_wait,
        show_progress=not args.json,
    )
    if args.no_wait:
        job = version.finetuning_job.uuid
        hint = f"{version.id} is {version.status} (job {job}); follow it with: tuneforge jobs watch {job}"
        return emit(args.json, version, lambda: hint)
    return emit(args.json, version, lambda: adapter_details(version))


def adapters_list(client: Tuneforge, args: argparse.Namespace) -> int:
    repo = client.repos.get(args.repo)
    return emit(args.json, repo.versions, lambda: versions_table(repo))


def adapters_show(client: Tuneforge, args: argparse.Namespace) -> int:
    version = client.adapters.get(args.adapter_id)
    return emit(args.json, version, lambda: adapter_details(version))


def adapters_download(client: Tuneforge, args: argparse.Namespace) -> int:
    path = client.adapters.download(args.adapter_id, args.dest)
    return emit(args.json, {"adapter": args.adapter_id, "path": str(path)}, lambda: str(path))


def adapters_export(client: Tuneforge, args: argparse.Namespace) -> int:
    wait = not args.no_wait
    record = client.adapters.export(
        args.adapter_id, args.dest, merged=args.merged, wait=wait, timeout=args.timeout
    )
    done = f"{args.adapter_id}: merged model written to {record.get('path')}"
    pending = f"{args.adapter_id}: export {record['status']}; run this again to wait for it and download it"
    return emit(args.json, record, lambda: done if "path" in record else pending)


def adapters_cancel(client: Tuneforge, args: argparse.Namespace) -> int:
    job = client.adapters.cancel(args.adapter_id)
    return emit(args.json, job, lambda: f"{job.adapter_id}: job {job.uuid} is {job.status}")


def jobs_watch(client: Tuneforge, args: argparse.Namespace) -> int:
    uuid = args.job
    if "/" in uuid:  # an adapter id: follow the job that trains it
        repo, tag = parse_adapter_id(uuid)
        uuid = client.adapters.get(f"{repo}/{tag}").finetuning_job.uuid or ""
        if not uuid:
            raise ValueError(f"adapter {args.job} was uploaded, not trained: it has no job to watch")
    job = client.finetuning.jobs.watch(uuid, show_progress=not args.json)
    emit(args.json, job, lambda: job_line(job))
    job.raise_for_status()  # an errored or canceled job fails the command, with the job's error
    return 0


def jobs_list(client: Tuneforge, args: argparse.Namespace) -> int:
    found = client.finetuning.jobs.list(limit=args.limit)
    rows = [(j.uuid, j.adapter_id, j.status, _steps(j), j.base_model, j.created_at) for j in found]
    headers = ("job", "adapter", "status", "steps", "base model", "created")
    return emit(args.json, found, lambda: table(headers, rows))


def job_line(job: FinetuningJob) -> str:
    return f"job {job.uuid} ({job.adapter_id}): {job.status}, {_steps(job)} steps"


def _steps(job: FinetuningJob) -> str:
    return f"{job.steps_done}/{job.total_steps}" if job.total_steps else str(job.steps_done)


# --- deployments and prompting --------------------------------------------------------------------


def deployments_create(client: Tuneforge, args: argparse.Namespace) -> int:
    config = {"base_model": args.base_model, "preloaded_adapters": args.preload or None}
    chosen = {key: value for key, value in config.items() if value is not None}
    deployment = client.deployments.create(
        args.name, config=chosen, description=args.description, wait=not args.no_wait
    )
    return emit(args.json, deployment, lambda: deployments_table([deployment]))


def deployments_list(client: Tuneforge, args: argparse.Namespace) -> int:
    found = client.deployments.list()
    return emit(args.json, found, lambda: deployments_table(found))


def deployments_rm(client: Tuneforge, args: argparse.Namespace) -> int:
    client.deployments.delete(args.name)
    return deleted(args, "deployment")


def deployments_table(found: list[Deployment]) -> str:
    rows = [(d.name, d.base_model, d.status, d.current_replicas, d.description) for d in found]
    return table(("name", "base model", "status", "replicas", "description"), rows)


def prompt(client: Tuneforge, args: argparse.Namespace) -> int:
    serving = client.deployments.client(args.deployment)
    parameters = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    if args.json:
        response = serving.generate(args.text, adapter_id=args.adapter, **parameters)
        return emit(True, response, str)
    for chunk in serving.generate_stream(args.text, adapter_id=args.adapter, **parameters):
        if not chunk.token.special:
            sys.stdout.write(chunk.token.text)
            sys.stdout.flush()  # each token as it arrives
    sys.stdout.write("\n")
    return 0
