"""The balancing decisions without sockets: smooth weighted round-robin of splits, the power of
two choices, random, and locality tiers, on a seeded random source."""

from __future__ import annotations

import random
from collections import Counter

from registry.model import Backend
from ztunnel.balancing import WeightedSplits, balance, locality_tiers

STABLE, CANARY = "shop/web-v1", "shop/web-v2"


def split(stable: int, canary: int) -> tuple[Backend, ...]:
    return Backend(STABLE, stable), Backend(CANARY, canary)


def longest_run(picks: list[str], backend: str) -> int:
    longest = run = 0
    for pick in picks:
        run = run + 1 if pick == backend else 0
        longest = max(longest, run)
    return longest


def test_a_90_10_split_over_1000_connections_is_900_100_and_interleaved():
    splits = WeightedSplits()
    picks = [splits.order("shop/web", split(90, 10))[0].service for _ in range(1000)]
    assert Counter(picks) == {STABLE: 900, CANARY: 100}
    assert longest_run(picks, CANARY) == 1 and longest_run(picks, STABLE) <= 10  # no burst to one side
    for window in range(0, 1000, 100):  # every hundred connections already hold the shares
        assert picks[window:window + 100].count(CANARY) == 10
    assert splits.picks("shop/web") == {STABLE: 900, CANARY: 100}


def test_the_chosen_backend_comes_first_then_the_others_heaviest_first_never_a_zero_weight():
    splits = WeightedSplits()
    three = (Backend("shop/a", 1), Backend("shop/b", 0), Backend("shop/c", 3))
    orders = [[b.service for b in splits.order("shop/web", three)] for _ in range(4)]
    assert orders == [["shop/c", "shop/a"], ["shop/a", "shop/c"], ["shop/c", "shop/a"], ["shop/c", "shop/a"]]
    assert splits.order("shop/web", (Backend("shop/a", 0), Backend("shop/c", 0))) == []


def test_a_weight_change_applies_from_the_next_connection():
    splits = WeightedSplits()
    for _ in range(7):  # leave the 90/10 rotation mid-cycle
        splits.order("shop/web", split(90, 10))
    after = [splits.order("shop/web", split(50, 50))[0].service for _ in range(10)]
    assert Counter(after) == {STABLE: 5, CANARY: 5} and longest_run(after, STABLE) == 1
    assert splits.order("shop/web", split(0, 100))[0].service == CANARY  # the rollout's last step
    assert splits.picks("shop/web") == {STABLE: 0, CANARY: 1}  # counts are those of the weights in force


def test_each_split_service_keeps_its_own_rotation():
    splits = WeightedSplits()
    assert splits.order("shop/web", split(1, 1))[0].service == STABLE
    assert splits.order("shop/api", split(1, 1))[0].service == STABLE
    assert splits.order("shop/web", split(1, 1))[0].service == CANARY


ADDRESSES = ["10.244.1.1:8080", "10.244.1.2:8080", "10.244.1.3:8080"]


def firsts(balancer: str, load: dict[str, int], rng: random.Random, count: int = 1000) -> Counter[str]:
    return Counter(ADDRESSES[next(balance(ADDRESSES, balancer, turn, rng, load))] for turn in range(count))


def test_least_request_moves_new_connections_away_from_a_loaded_endpoint():
    rng = random.Random(7)
    loaded = firsts("LEAST_REQUEST", {ADDRESSES[0]: 50, ADDRESSES[1]: 1, ADDRESSES[2]: 2}, rng)
    # the loaded one wins only a draw of itself with itself, which two distinct choices never are
    assert loaded[ADDRESSES[0]] == 0
    # 1 beats 2 in their draws and in its draws with 0; 2 wins only its draws with 0: about 2/3 vs 1/3
    assert 600 < loaded[ADDRESSES[1]] < 730 and loaded[ADDRESSES[1]] + loaded[ADDRESSES[2]] == 1000
    even = firsts("LEAST_REQUEST", {}, rng)
    assert all(280 < even[a] < 390 for a in ADDRESSES), even


def test_random_spreads_evenly_and_round_robin_follows_the_turn():
    spread = firsts("RANDOM", {}, random.Random(3))
    assert all(280 < spread[a] < 390 for a in ADDRESSES), spread
    assert [list(balance(ADDRESSES, "ROUND_ROBIN", turn, random.Random(0), {})) for turn in (0, 4)] == [
        [0, 1, 2], [1, 2, 0]]


def test_a_choice_is_followed_by_the_others_in_rotation_order():
    rng = random.Random(1)
    for balancer in ("RANDOM", "LEAST_REQUEST"):
        order = list(balance(ADDRESSES, balancer, 0, rng, {}))
        assert sorted(order) == [0, 1, 2] and order[1] == (order[0] + 1) % 3


def test_locality_tiers_are_this_node_then_this_zone_then_the_rest():
    places = [("n3", "z2"), ("n2", "z1"), ("n1", "z1"), (None, None), ("n1", "z1")]
    assert locality_tiers(places, "n1", "z1") == [[2, 4], [1], [0, 3]]
    assert locality_tiers(places, "n1", None) == [[2, 4], [0, 1, 3]]  # no zone known: this node, then the rest
    assert locality_tiers(places, "n9", None) == [[0, 1, 2, 3, 4]]  # nothing known to be close
    assert locality_tiers([("n2", "z1")], "n1", "z1") == [[0]]  # empty tiers are left out


def test_a_registry_update_with_the_same_weights_keeps_the_rotation():
    splits = WeightedSplits()
    first = [splits.order("shop/web", split(1, 1))[0].service for _ in range(3)]
    again = splits.order("shop/web", split(1, 1))[0].service  # new Backend values, equal to the old
    assert first + [again] == [STABLE, CANARY, STABLE, CANARY]
    assert splits.picks("shop/web") == {STABLE: 2, CANARY: 2}
