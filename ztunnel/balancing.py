"""Which endpoint or backend a new connection goes to: weighted splits, the balancers, locality.

Pure: the state kept between connections is the smooth weighted round-robin of each split Service
(`WeightedSplits`); everything else is a function of the candidates, a turn, the live connection
counts and a random source the caller owns (seeded in tests).

- Weighted split (a TCPRoute's weighted backendRefs, an SMI TrafficSplit): nginx's smooth
  weighted round-robin. Each pick adds every backend's weight to its running score, takes the
  highest score and subtracts the total from it, so 90/10 sends one connection in ten to the
  canary, spread evenly (never two canary connections in a row), and the counts stay close to
  the weights' shares at every point, not only over a whole cycle.
- Balancers within one Service's endpoints: ROUND_ROBIN (the Service's turn), RANDOM, and
  LEAST_REQUEST as the power of two random choices (Envoy's and Linkerd's): two endpoints drawn
  at random, the one with fewer live connections from this node wins, so a loaded endpoint is
  passed over without scanning every endpoint's count.
- Locality (spec.trafficDistribution: PreferClose): endpoints on this node, then in this node's
  zone, then the rest; a connection goes to a farther tier only when every closer endpoint is
  ejected or absent.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

from registry.model import Backend, LoadBalancer


@dataclass
class _Split:
    weights: tuple[Backend, ...]  # the split the scores were made for
    scores: list[int]  # nginx's current_weight of each backend, in the split's order
    picks: dict[str, int]  # connections sent to each backend Service since the split last changed


class WeightedSplits:
    """Smooth weighted round-robin per split Service, kept across registry updates. A change of
    the weights starts the scores afresh, so the next connection already follows the new ones."""

    def __init__(self) -> None:
        self._splits: dict[str, _Split] = {}  # split Service key -> its scores

    def order(self, service: str, split: tuple[Backend, ...]) -> list[Backend]:
        """The backends of `service`'s split for one new connection: the weighted choice first,
        then the other backends of some weight, heaviest first (where a retry goes when the
        chosen backend has no endpoint left to try). Empty when every weight is 0."""
        state = self._splits.get(service)
        if state is None or state.weights != split:
            state = self._splits[service] = _Split(split, [0] * len(split), {b.service: 0 for b in split})
        total = sum(b.weight for b in split)
        if total <= 0:
            return []
        scores = state.scores
        for i, backend in enumerate(split):
            scores[i] += backend.weight
        chosen = max(range(len(split)), key=scores.__getitem__)  # the first of equal scores
        scores[chosen] -= total
        state.picks[split[chosen].service] += 1
        others = sorted((b for i, b in enumerate(split) if i != chosen and b.weight > 0), key=lambda b: -b.weight)
        return [split[chosen], *others]

    def picks(self, service: str) -> Mapping[str, int]:
        """Connections sent to each backend of `service`'s split since its weights last changed."""
        state = self._splits.get(service)
        return dict(state.picks) if state is not None else {}


def balance(addresses: Sequence[str], balancer: LoadBalancer, turn: int, rng: random.Random,
            load: Mapping[str, int]) -> Iterator[int]:
    """The positions of `addresses` ("ip:port" of one tier's endpoints) in the order one
    connection tries them: the balancer's choice, then the rest in rotation order after it.
    `load` is the live connections from this node by "ip:port" (read by LEAST_REQUEST)."""
    count = len(addresses)
    if count == 1:
        first = 0
    elif balancer == "RANDOM":
        first = rng.randrange(count)
    elif balancer == "LEAST_REQUEST":
        a, b = rng.sample(range(count), 2)
        first = b if load.get(addresses[b], 0) < load.get(addresses[a], 0) else a
    else:
        first = turn % count
    return ((first + i) % count for i in range(count))


Place = tuple[str | None, str | None]  # an endpoint's node and zone, None when unknown


def locality_tiers(places: Sequence[Place], node: str, zone: str | None) -> list[list[int]]:
    """The positions of endpoints by `places`: those on `node`, then those in `zone` (when
    known), then the rest; empty tiers left out."""
    tiers: list[list[int]] = [[], [], []]
    for i, (endpoint_node, endpoint_zone) in enumerate(places):
        tiers[0 if endpoint_node == node else 1 if zone is not None and endpoint_zone == zone else 2].append(i)
    return [tier for tier in tiers if tier]
