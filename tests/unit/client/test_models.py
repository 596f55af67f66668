"""The client's wire models read what the server sends, including keys newer servers add."""

from __future__ import annotations

from tuneforge.models import JobPhase


def test_a_timeline_entry_keeps_its_detail_and_a_plain_status_has_none() -> None:
    phase = JobPhase.model_validate(
        {"startedAt": "2026-05-12T10:00:00+00:00", "detail": "speculator step 120", "later": 1}
    )
    assert phase.detail == "speculator step 120" and phase.started_at is not None
    assert JobPhase.model_validate({"startedAt": "2026-05-12T10:00:00+00:00"}).detail is None
