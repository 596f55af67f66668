"""`tuneforge models pull | import | list | show | rm`: the model store, administered on a server machine."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy.orm import Session
from tuneforge.cli.tables import fields, table
from tuneforge.rules.base_models import SERVED_MODEL_TYPES

from app.cli.server_commands import server_settings
from app.context import AppContext
from app.db import StoredModel, migrate
from app.services import base_models, model_store
from app.services.base_models import AvailableModel

T = TypeVar("T")


@contextmanager
def _context(args: argparse.Namespace) -> Iterator[AppContext]:
    settings = server_settings(args.data_dir)
    migrate.upgrade(settings.database_url)
    ctx = AppContext.from_settings(settings)
    try:
        yield ctx
    finally:
        ctx.close()


def _in_session(args: argparse.Namespace, work: Callable[[AppContext, Session], T]) -> T:
    with _context(args) as ctx, ctx.sessions() as session:
        return work(ctx, session)


def cmd_pull(args: argparse.Namespace) -> int:
    def pull(ctx: AppContext, session: Session) -> StoredModel:
        return model_store.pull(ctx.store, session, ctx.settings, args.name, replace=args.replace)

    _print_stored(_in_session(args, pull))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    directory = Path(args.directory).expanduser()

    def do_import(ctx: AppContext, session: Session) -> StoredModel:
        return model_store.import_directory(
            ctx.store, session, ctx.settings, directory, args.name, replace=args.replace
        )

    _print_stored(_in_session(args, do_import))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    models = _in_session(args, lambda ctx, session: base_models.catalogue(ctx.settings, session))
    headers = ("name", "source", "architecture", "parameters", "context length", "servable")
    rows = [
        (m.name, m.source, m.model_type, human_count(m.parameter_count), m.context_length,
         "yes" if m.servable else "no")
        for m in models
    ]  # fmt: skip
    print(table(headers, rows))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    def show(ctx: AppContext, session: Session) -> tuple[AvailableModel, StoredModel | None]:
        return base_models.get(ctx.settings, session, args.name), model_store.find(session, args.name)

    model, row = _in_session(args, show)
    pairs: list[tuple[str, object]] = [
        ("name", model.name),
        ("source", model.source),
        ("description", model.description),
        ("architecture", model.model_type),
        ("parameters", model.parameter_count),
        ("context length", model.context_length),
        ("servable", "yes" if model.servable else f"no (tuneforge serves {', '.join(SERVED_MODEL_TYPES)})"),
    ]
    if row is not None:
        pairs += [("stored as", row.name), ("repo", row.repo_id), ("revision", row.revision),
                  ("bytes", row.total_bytes), ("stored at", row.created_at)]  # fmt: skip
    print(fields(pairs))
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    def remove(ctx: AppContext, session: Session) -> tuple[StoredModel, list[str]]:
        users = model_store.users_of(session, model_store.get(session, args.name).name)
        return model_store.remove(ctx.store, session, args.name, force=args.force), users

    row, users = _in_session(args, remove)
    if users:
        print(f"warning: {row.name} was still named by {', '.join(users)}; they will fail to load it")
    print(f"removed {row.name} from the model store ({row.total_bytes} bytes)")
    return 0


def _print_stored(row: StoredModel) -> None:
    at = f" at commit {row.revision}" if row.revision else ""
    print(
        f"stored {row.name}{at}: {row.model_type or 'unknown'} architecture, "
        f"{human_count(row.parameter_count)} parameters, {row.total_bytes} bytes"
    )


def human_count(count: int | None) -> str | None:
    """135M, 8.03B: a parameter count as people say it."""
    if count is None:
        return None
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return str(count)
