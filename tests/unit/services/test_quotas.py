"""The serving proxy's per-tenant limits: requests in flight and a token bucket, on a clock the test turns."""

from __future__ import annotations

import pytest

from app.errors import TooManyRequestsError
from app.services.quotas import ServingLimits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _limits(
    clock: Clock, *, max_waiting: int = 100, rate: float = 1000.0, burst: int = 1000
) -> ServingLimits:
    return ServingLimits(max_waiting=max_waiting, rate=rate, burst=burst, clock=clock)


def test_requests_in_flight_past_the_limit_are_refused_until_one_is_released() -> None:
    limits = _limits(Clock(), max_waiting=2)
    first, _second = limits.admit("acme"), limits.admit("acme")
    with pytest.raises(TooManyRequestsError, match="in flight") as caught:
        limits.admit("acme")
    assert (caught.value.status_code, caught.value.retry_after) == (429, 1)
    limits.admit("other").release()  # another tenant has slots of its own
    first.release()
    first.release()  # idempotent: a double release must not hand out an extra slot
    assert limits.waiting("acme") == 1
    limits.admit("acme")
    with pytest.raises(TooManyRequestsError):
        limits.admit("acme")


def test_the_token_bucket_allows_a_burst_then_refills_at_the_rate() -> None:
    clock = Clock()
    limits = _limits(clock, rate=2.0, burst=3)
    for _ in range(3):
        limits.admit("acme").release()
    with pytest.raises(TooManyRequestsError, match="per second") as caught:
        limits.admit("acme")
    assert caught.value.retry_after == 1  # half a second to the next token, rounded up
    limits.admit("other").release()
    clock.now += 0.5
    limits.admit("acme").release()
    with pytest.raises(TooManyRequestsError):
        limits.admit("acme")
    clock.now += 60  # idle: the bucket refills to its burst, no further
    for _ in range(3):
        limits.admit("acme").release()
    with pytest.raises(TooManyRequestsError):
        limits.admit("acme")


def test_retry_after_is_the_wait_for_the_next_token_at_a_slow_rate() -> None:
    limits = _limits(Clock(), rate=0.1, burst=1)
    limits.admit("acme").release()
    with pytest.raises(TooManyRequestsError) as caught:
        limits.admit("acme")
    assert caught.value.retry_after == 10


def test_a_request_refused_for_too_many_in_flight_spends_no_token() -> None:
    limits = _limits(Clock(), max_waiting=1, rate=0.001, burst=2)
    held = limits.admit("acme")
    for _ in range(5):
        with pytest.raises(TooManyRequestsError, match="in flight"):
            limits.admit("acme")
    held.release()
    limits.admit("acme")  # the second token of the burst is still there


def test_idle_tenants_buckets_do_not_accumulate() -> None:
    clock = Clock()
    limits = _limits(clock, rate=10.0, burst=5)
    for n in range(5000):
        limits.admit(f"t{n}").release()
    clock.now += 1  # every bucket is full again, so none needs remembering
    limits.admit("late").release()
    assert len(limits._buckets) < 10
