"""Rendezvous hashing with bounded load: stable, minimal movement, and a hot key spills over."""

from __future__ import annotations

from collections import Counter

import pytest

from app.supervision.routing import choose, load_bound, ranking, route_key

REPLICAS = ["replica-0", "replica-1", "replica-2", "replica-3"]
KEYS = [route_key("acme", f"repo/{n}") for n in range(400)]


def test_the_same_key_goes_to_the_same_replica_every_time_and_keys_spread() -> None:
    idle = [0] * len(REPLICAS)
    first = [choose(key, REPLICAS, idle)[0] for key in KEYS]
    assert first == [choose(key, REPLICAS, idle)[0] for key in KEYS]
    counts = Counter(first)
    assert set(counts) == set(range(len(REPLICAS)))
    assert min(counts.values()) > len(KEYS) / len(REPLICAS) / 2, counts


def test_a_tenant_is_part_of_the_key() -> None:
    pairs = [(route_key("a", f"r/{n}"), route_key("b", f"r/{n}")) for n in range(50)]
    assert any(ranking(a, REPLICAS)[0] != ranking(b, REPLICAS)[0] for a, b in pairs)


def test_a_replica_that_leaves_moves_only_the_keys_it_had() -> None:
    before = {key: REPLICAS[ranking(key, REPLICAS)[0]] for key in KEYS}
    left = [name for name in REPLICAS if name != "replica-2"]
    after = {key: left[ranking(key, left)[0]] for key in KEYS}
    moved = {key for key in KEYS if before[key] != after[key]}
    assert moved == {key for key in KEYS if before[key] == "replica-2"}
    assert moved, "replica-2 had some keys"


def test_a_replica_that_joins_takes_keys_only_for_itself() -> None:
    three = REPLICAS[:3]
    before = {key: three[ranking(key, three)[0]] for key in KEYS}
    after = {key: REPLICAS[ranking(key, REPLICAS)[0]] for key in KEYS}
    assert all(after[key] in (before[key], "replica-3") for key in KEYS)


def test_a_hot_key_spills_to_its_next_replica_only_past_the_bound() -> None:
    key = KEYS[0]
    order = ranking(key, REPLICAS)
    in_flight = [0] * len(REPLICAS)
    taken = []
    for _ in range(20):
        bound = load_bound(in_flight)
        chosen = choose(key, REPLICAS, in_flight)[0]
        assert in_flight[chosen] < bound
        if in_flight[order[0]] < bound:
            assert chosen == order[0], "the key's own replica keeps it while under the bound"
        taken.append(chosen)
        in_flight[chosen] += 1
    assert taken[0] == order[0]
    assert next(i for i in taken if i != order[0]) == order[1], "the spill follows the key's ranking"
    assert len(set(taken)) == len(REPLICAS), "a key hot enough reaches every replica"
    assert max(in_flight) <= 7, "no replica over (1 + 0.25) x the mean of 5"


def test_a_busy_cluster_leaves_the_key_on_its_replica_while_the_load_is_even() -> None:
    key = KEYS[0]
    order = ranking(key, REPLICAS)
    in_flight = [3] * len(REPLICAS)
    in_flight[order[0]] = 4  # 15 in flight: bound ceil(1.25 * 16 / 4) = 5
    assert choose(key, REPLICAS, in_flight)[0] == order[0]
    in_flight[order[0]] = 5
    assert choose(key, REPLICAS, in_flight)[0] == order[1]


def test_the_order_covers_every_replica_once_starting_at_the_choice() -> None:
    in_flight = [5, 0, 0, 0]
    for key in KEYS[:50]:
        order = choose(key, REPLICAS, in_flight)
        assert sorted(order) == list(range(len(REPLICAS)))
        assert in_flight[order[0]] < load_bound(in_flight)


def test_one_replica_takes_everything_and_mismatched_counts_are_refused() -> None:
    assert choose(KEYS[0], ["only"], [100]) == [0]
    assert choose(KEYS[0], [], []) == []
    with pytest.raises(ValueError):
        choose(KEYS[0], REPLICAS, [0])
