"""Every per-step metric field the shared rules name is a column of the stored metric row."""

from __future__ import annotations

from tuneforge.rules.metrics import STEP_METRIC_FIELDS

from app.db import JobMetric


def test_each_step_metric_field_has_a_column() -> None:
    columns = set(JobMetric.__table__.columns.keys())
    assert set(STEP_METRIC_FIELDS) <= columns
    # What a row holds besides the metrics: its keys, bookkeeping and the task's own metrics (JSON).
    bookkeeping = {"id", "job_id", "step", "attempt", "created_at", "task_metrics"}
    assert columns - set(STEP_METRIC_FIELDS) == bookkeeping
