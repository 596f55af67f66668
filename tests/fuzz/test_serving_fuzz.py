"""Schemathesis against a serving process's OpenAPI (OpenAI and LoRAX routes over a real tiny engine).

Coverage cases, generated requests that fit the schema and that do not, undeclared headers and
extreme numbers in accepted bodies: over a thousand requests, in process. No answer may be a 5xx,
no request may hang, and the engine must keep answering (a request that stops it is a finding; the
run goes on against a fresh engine so that one such request cannot hide the others).
"""

from __future__ import annotations

from pathlib import Path

from fuzz_support import Budget, fuzz, operations
from fuzz_targets import ServingTarget

MIN_REQUESTS = 1000


def test_generated_requests_to_every_serving_operation_get_no_5xx_and_none_hangs(
    fuzz_model_dir: Path, fuzz_adapter_root: Path
) -> None:
    target = ServingTarget(fuzz_model_dir, fuzz_adapter_root)
    try:
        run = fuzz(
            target,
            Budget(examples_per_operation=30, coverage_per_operation=150, max_seconds=240, max_restarts=3),
        )
    finally:
        target.close()
    report = run.summary(target.name)
    print(report)
    assert not run.findings, report
    assert not run.stopped, report
    assert run.sent >= MIN_REQUESTS, report
    assert set(run.by_operation) == {f"{op.method.upper()} {op.path}" for op in operations(target.schema)}
