"""Schemathesis against the control plane's OpenAPI on both stacks, as a tenant with a real pb_ token.

Every operation gets Schemathesis's coverage cases, generated requests that fit the schema and that
do not, undeclared headers, and extreme numbers in accepted bodies; over a thousand requests per
stack, in process. No answer may be a 5xx, no exception may escape the app, no request may hang.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fuzz_support import Budget, fuzz, operations
from fuzz_targets import BASE_MODELS, ControlPlaneTarget, ServingBackend
from schemathesis.python import asgi
from tests_support import TEST_SECRET_KEY

STACKS = ("embedded", "postgres_s3")
MIN_REQUESTS = 1000


@pytest.mark.parametrize("stack", STACKS)
def test_generated_requests_to_every_control_plane_operation_get_no_5xx_and_none_hangs(
    stack: str,
    stack_settings_factory: Callable[..., Any],
    validate_worker_for: Callable[[Any], Any],
    serving_backend: ServingBackend,
    tmp_path: Path,
) -> None:
    # One serving backend for both stacks: both sign with the secret it verifies.
    settings = stack_settings_factory(
        stack, secret_key=TEST_SECRET_KEY, serving_urls={m: serving_backend.url for m in BASE_MODELS}
    )
    validate_worker_for(settings)  # the seeded dataset is validated on a real validate worker
    target = ControlPlaneTarget(f"control plane ({stack})", settings, tmp_path)
    try:
        run = fuzz(target, Budget(examples_per_operation=25, max_seconds=240))
    finally:
        asgi.shutdown_lifespans()
    report = run.summary(target.name)
    print(report)
    assert not run.stopped, report
    assert run.sent >= MIN_REQUESTS, report
    assert set(run.by_operation) == {f"{op.method.upper()} {op.path}" for op in operations(target.schema)}
    assert not run.findings, report
