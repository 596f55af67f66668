"""Which replica of a serving key takes a request: rendezvous hashing with bounded load.

A request's route key is its caller's tenant and adapter, so one adapter's requests meet the replica
where it is already loaded (its weights in memory, its prefix cache warm). Rendezvous (highest random
weight) hashing ranks the replicas per route key: a replica that leaves moves only the route keys it
ranked first, and one that joins takes only those it now ranks first. The bound keeps one hot adapter
from piling onto one replica: a replica takes a new request only while its in-flight count is under
ceil((1 + epsilon) * (in flight in all + 1) / replicas); otherwise the next replica in the key's
ranking does ("Consistent Hashing with Bounded Loads", Mirrokni, Thorup, Zadimoghaddam 2018).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

LOAD_EPSILON = 0.25


def route_key(tenant: str, adapter: str) -> str:
    """One key per (tenant, adapter): tenants' adapters of one name are different adapters."""
    return f"{tenant}\x00{adapter}"


def ranking(key: str, replicas: Sequence[str]) -> list[int]:
    """Indexes of `replicas` (stable names), the one `key` prefers first."""
    weights = [_weight(key, name) for name in replicas]
    return sorted(range(len(replicas)), key=lambda index: (-weights[index], replicas[index]))


def load_bound(in_flight: Sequence[int], epsilon: float = LOAD_EPSILON) -> int:
    """The in-flight count under which a replica still takes a new request."""
    return math.ceil((1 + epsilon) * (sum(in_flight) + 1) / len(in_flight))


def choose(
    key: str, replicas: Sequence[str], in_flight: Sequence[int], epsilon: float = LOAD_EPSILON
) -> list[int]:
    """Indexes of `replicas` in the order to try them: the first in `key`'s ranking that is under the
    load bound, then the ones after it, then the ones before it (a retry takes the next)."""
    if len(replicas) != len(in_flight):
        raise ValueError("one in-flight count per replica")
    order = ranking(key, replicas)
    if not order:
        return []
    bound = load_bound(in_flight, epsilon)
    for position, index in enumerate(order):
        if in_flight[index] < bound:
            return order[position:] + order[:position]
    return order  # cannot happen (the bound exceeds the mean), kept total for safety


def _weight(key: str, replica: str) -> int:
    digest = hashlib.blake2b(f"{key}\x00{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
