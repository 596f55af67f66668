"""Nothing accepted is lost: datasets a crash left `validating` are validated when the server starts."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from app.context import AppContext
from app.db import Dataset, DatasetStatus
from app.db.session import transaction
from app.main import create_app
from app.services import auth


@pytest.mark.parametrize("stack", ["embedded", "postgres_s3"])
def test_dataset_left_validating_is_validated_on_next_start(stack: str, stack_settings_factory) -> None:
    settings = stack_settings_factory(stack)
    # What a crash between "upload registered" and "verdict recorded" leaves behind.
    ctx = AppContext.from_settings(settings)
    with transaction(ctx.sessions) as session:
        user = auth.get_or_create_user(session, "crashed", "carol")
        key = f"tenants/{user.tenant.uuid}/datasets/recovery/data.csv"
        ctx.store.put_stream(key, [b"prompt,completion\n", b"q,a\n"])
        session.add(Dataset(tenant_id=user.tenant_id, name="orphan", file_name="data.csv", blob_key=key,
                            status=DatasetStatus.VALIDATING, mime_type="text/csv"))  # fmt: skip
    ctx.close()

    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 30
        with client.app.state.ctx.sessions() as session:  # type: ignore[attr-defined]
            while True:
                row = session.query(Dataset).filter_by(name="orphan").one()
                if row.status != DatasetStatus.VALIDATING or time.monotonic() > deadline:
                    break
                session.expire_all()
                time.sleep(0.05)
    assert row.status == DatasetStatus.CONNECTED and row.row_count == 1
