"""Outlier detection, the circuit breaker of each endpoint: Envoy's consecutive-gateway-failure
ejection at connect time. Pure: a state machine per endpoint, fed with connect outcomes and a clock.

  CLOSED     connections go to it; `consecutive_failures` connect failures in a row eject it
  OPEN       no new connection goes to it until `ejected_until`: base_ejection_time x the number
             of times it was ejected (capped at max_ejection_time)
  HALF-OPEN  the ejection time is over: one trial connection decides, a success closes the
             breaker, a failure ejects it again for longer

Each Service's thresholds are its own (TrafficPolicy.outlier: a DestinationRule's outlierDetection,
else Envoy's defaults), given with each outcome. An ejection that would leave more than
`max_ejection_percent` of a Service's endpoints ejected does not happen, so a breaker never
empties a Service. An endpoint that stays CLOSED for max_ejection_time forgets its past ejections.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from registry.model import OutlierSettings

EndpointKey = tuple[str, str]  # (service "namespace/name", endpoint "ip:port")


@dataclass
class _Endpoint:
    failures: int = 0  # consecutive connect failures
    ejections: int = 0  # times ejected, until it has been healthy for max_ejection_time
    ejected_until: float | None = None  # set while OPEN or HALF-OPEN
    trial: bool = False  # a HALF-OPEN endpoint's one trial connection is under way
    healthy_since: float = 0.0


class OutlierDetector:
    """Breaker state of every endpoint that has failed; endpoints never seen failing are CLOSED."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # service -> endpoint "ip:port" -> its breaker, for endpoints that have failed lately only
        self._endpoints: dict[str, dict[str, _Endpoint]] = {}
        self.ejections_total: dict[str, int] = {}  # by service, ever

    def _get(self, key: EndpointKey) -> _Endpoint | None:
        service, address = key
        return self._endpoints.get(service, {}).get(address)

    def state(self, key: EndpointKey) -> str:
        """CLOSED, OPEN or HALF-OPEN."""
        endpoint = self._get(key)
        if endpoint is None or endpoint.ejected_until is None:
            return "CLOSED"
        return "OPEN" if self._clock() < endpoint.ejected_until else "HALF-OPEN"

    def ejected_until(self, key: EndpointKey) -> float | None:
        """When an OPEN endpoint's ejection ends, on this detector's clock."""
        endpoint = self._get(key)
        return endpoint.ejected_until if endpoint is not None else None

    def available(self, key: EndpointKey) -> bool:
        """Whether a new connection may plan to try `key`: CLOSED, or HALF-OPEN with its trial free."""
        state = self.state(key)
        return state == "CLOSED" or (state == "HALF-OPEN" and not self._get(key).trial)  # type: ignore[union-attr]

    def unavailable(self, service: str) -> frozenset[str]:
        """The endpoints ("ip:port") of `service` a new connection may not plan to try now. Per
        connection this looks only at the Service's endpoints that failed lately: usually none."""
        tracked = self._endpoints.get(service)
        if not tracked:
            return frozenset()
        return frozenset(address for address in tracked if not self.available((service, address)))

    def begin(self, key: EndpointKey) -> bool:
        """A connect to `key` starts: False if it may not (OPEN, or another connection holds the
        HALF-OPEN trial); a HALF-OPEN endpoint's trial is taken until `record` or `release`."""
        if not self.available(key):
            return False
        if self.state(key) == "HALF-OPEN":
            self._get(key).trial = True  # type: ignore[union-attr]
        return True

    def release(self, key: EndpointKey) -> None:
        """A connect to `key` ended without saying anything of the endpoint (cancelled, or refused
        by policy): a trial it held is free again."""
        endpoint = self._get(key)
        if endpoint is not None:
            endpoint.trial = False

    def ejected(self, service: str) -> int:
        """Endpoints of `service` OPEN or HALF-OPEN now."""
        return sum(1 for e in self._endpoints.get(service, {}).values() if e.ejected_until is not None)

    def ejected_endpoints(self, service: str) -> frozenset[str]:
        """The endpoints ("ip:port") of `service` OPEN or HALF-OPEN now."""
        return frozenset(address for address, e in self._endpoints.get(service, {}).items()
                         if e.ejected_until is not None)

    def record(self, key: EndpointKey, ok: bool, endpoints_in_service: int,
               settings: OutlierSettings = OutlierSettings()) -> None:
        """The outcome of a connect to `key`, a Service endpoint among `endpoints_in_service`,
        judged by its Service's `settings` (a DestinationRule's outlierDetection, else Envoy's defaults)."""
        now = self._clock()
        service, address = key
        endpoint = self._get(key)
        if ok:
            if endpoint is None:
                return
            if endpoint.ejected_until is not None:  # a good trial closes the breaker
                endpoint.ejected_until, endpoint.trial, endpoint.healthy_since = None, False, now
            endpoint.failures = 0
            if now - endpoint.healthy_since >= settings.max_ejection_time:
                del self._endpoints[service][address]  # healthy long enough: its past ejections are forgotten
                if not self._endpoints[service]:
                    del self._endpoints[service]
            return
        if endpoint is None:
            endpoint = self._endpoints.setdefault(service, {})[address] = _Endpoint(healthy_since=now)
        endpoint.failures += 1
        if endpoint.ejected_until is not None:  # a failed trial: open again, for longer
            endpoint.trial = False
            self._eject(key, endpoint, now, settings)
        elif settings.consecutive_failures and endpoint.failures >= settings.consecutive_failures:
            allowed = endpoints_in_service * settings.max_ejection_percent // 100
            if self.ejected(key[0]) < allowed:
                self._eject(key, endpoint, now, settings)

    def _eject(self, key: EndpointKey, endpoint: _Endpoint, now: float, settings: OutlierSettings) -> None:
        endpoint.ejections += 1
        endpoint.ejected_until = now + min(settings.base_ejection_time * endpoint.ejections, settings.max_ejection_time)
        self.ejections_total[key[0]] = self.ejections_total.get(key[0], 0) + 1
