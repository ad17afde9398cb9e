"""Which keys each snapshot of a registry changed, so a reader holding an older snapshot can learn
what a newer one changed without comparing the two whole (registry/replica.py's deltas).

A registry that publishes snapshots one after another (registry/incremental.py, the registrations
layer of registry/registrations.py) gives each snapshot its place in a `ChangeLog`; publishing the
next one records, at the old place, the keys it changed. Places are linked forward only (an older
place holds the newer ones, never the reverse): a place no snapshot holds any more, with all the
places before it, is freed, so the log holds only what some reader may still ask about.
"""

from __future__ import annotations

from typing import Collection


class ChangeLog:
    """One snapshot's place in its registry's history: the keys the next snapshot changed."""

    __slots__ = ("serial", "workloads", "services", "next")

    def __init__(self, serial: int = 0) -> None:
        self.serial = serial  # how many snapshots came before this one in its log
        self.workloads: Collection[str] = ()  # keys of the workload index the next snapshot changed
        self.services: Collection[str] = ()  # keys of the Service index the next snapshot changed
        self.next: ChangeLog | None = None  # the next snapshot's place, once it is published

    def record(self, workloads: Collection[str], services: Collection[str]) -> ChangeLog:
        """Notes the keys the registry's next snapshot changed from this one; returns that snapshot's place."""
        self.workloads, self.services = workloads, services
        self.next = ChangeLog(self.serial + 1)
        return self.next

    def changes_to(self, later: ChangeLog, limit: int) -> tuple[set[str], set[str]] | None:
        """The workload and Service keys changed from this place to `later`; None when `later` does
        not follow this place in its log, or when more than `limit` keys changed on the way (then
        comparing the two snapshots whole costs less than the log)."""
        workloads: set[str] = set()
        services: set[str] = set()
        place, walked = self, 0
        while place is not later:
            if place.next is None:
                return None
            walked += len(place.workloads) + len(place.services)
            if walked > limit:
                return None
            workloads.update(place.workloads)
            services.update(place.services)
            place = place.next
        return workloads, services
