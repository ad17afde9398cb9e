"""A worker process's copy of the node's registry state, kept by deltas from the agent.

Placeholder of the workers branch with the interface the replica branch implements: this
version's delta is the whole state (old is ignored); the replica branch's version, which sends
only what changed, replaces this file at merge.
"""

from __future__ import annotations

from dataclasses import dataclass

from registry.model import RegistryState


@dataclass(frozen=True)
class StateDelta:
    """What turns a replica's state into the agent's (picklable): here, the whole new state."""

    state: RegistryState


def state_delta(old: RegistryState | None, new: RegistryState) -> StateDelta:
    """The delta from `old` (None: a replica that has nothing yet) to `new`."""
    return StateDelta(new)


class Replica:
    """The registry state as the deltas applied so far make it."""

    def __init__(self) -> None:
        self.state = RegistryState()

    def apply(self, delta: StateDelta) -> RegistryState:
        """Applies one delta and returns the new state."""
        self.state = delta.state
        return self.state
