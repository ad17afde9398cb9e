"""What of the registry this node's capture and certificates follow: its own enrolled pods.

`LocalPods` tells the reconcile loop whether a new registry state changes this node's enrolled
pod addresses (the capture map) or their identities (the certificates held): a change elsewhere in
the cluster (a pod on another node, a Service's endpoints) changes neither, so it costs the node
no BPF map rewrite and no certificate work. Pure: the agent carries out what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

from registry.model import RegistryState
from ztunnel.identity import Identity, workload_identity


@dataclass(frozen=True)
class LocalSet:
    """This node's enrolled pod addresses (sorted) and the identities they run as."""

    ips: tuple[str, ...]
    identities: frozenset[Identity]


class LocalPods:
    """The local set last carried out, and whether a state changes it."""

    def __init__(self, node: str, trust_domain: str) -> None:
        self.node = node
        self.trust_domain = trust_domain
        self._applied: LocalSet | None = None

    def of(self, state: RegistryState) -> LocalSet:
        """The local set `state` gives: one lookup of this node's workloads, not a scan of the cluster's."""
        enrolled = state.enrolled_on(self.node)
        return LocalSet(tuple(sorted(w.ip for w in enrolled)),
                        frozenset(workload_identity(w, self.trust_domain) for w in enrolled))

    def changed(self, state: RegistryState) -> LocalSet | None:
        """The new local set if `state` changes it (then it counts as carried out), else None."""
        wanted = self.of(state)
        if wanted == self._applied:
            return None
        self._applied = wanted
        return wanted
