"""Admission of plaintext to enrolled workloads: namespace label first, then the agent default."""

from __future__ import annotations

import pytest

from registry.model import Workload
from ztunnel.policy import PERMISSIVE, STRICT, Refused, admit_plaintext, mtls_mode


def workload(mode: str = "") -> Workload:
    return Workload("web", "shop", "10.244.2.10", "node-2", "web", enrolled=True, mtls_mode=mode)


@pytest.mark.parametrize("label, default, expected", [
    ("", PERMISSIVE, PERMISSIVE), ("", STRICT, STRICT),
    (STRICT, PERMISSIVE, STRICT), (PERMISSIVE, STRICT, PERMISSIVE),
])
def test_namespace_label_overrides_the_agent_default(label, default, expected):
    assert mtls_mode(workload(label), default) == expected


def test_strict_refuses_plaintext_naming_the_workload_and_permissive_admits_it():
    admit_plaintext(workload(PERMISSIVE), STRICT)
    with pytest.raises(Refused) as refused:
        admit_plaintext(workload(), STRICT)
    assert refused.value.reason == "strict_mtls"
    assert "shop/web" in str(refused.value) and "STRICT" in str(refused.value)


def test_a_claimed_source_is_believed_only_with_the_identity_the_registry_gives_it():
    from registry.model import RegistryState
    from ztunnel.identity import Identity
    from ztunnel.inbound import verified_source

    client = Workload("client", "shop", "10.244.1.10", "node-1", "client", enrolled=True)
    state = RegistryState(workloads=(client,))
    proved = Identity("cluster.local", "shop", "client")
    assert verified_source(state, "10.244.1.10", proved, "cluster.local") == client
    assert verified_source(state, "10.244.1.10", Identity("cluster.local", "shop", "web"), "cluster.local") is None
    assert verified_source(state, "10.244.1.99", proved, "cluster.local") is None  # nobody there
    assert verified_source(state, None, proved, "cluster.local") is None  # no claim
