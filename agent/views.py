"""Tables for people: the admin API's JSON rendered for `ameshctl ... -o table`. Pure functions."""

from __future__ import annotations

import dataclasses
import time

from tabulate import tabulate

from registry.model import TrafficPolicy
from ztunnel.rotation import short


def _table(headers: list[str], rows: list[list[object]], empty: str) -> str:
    return tabulate(rows, headers=headers, tablefmt="plain", disable_numparse=True) if rows else empty


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def status(data: dict) -> str:
    registry, datapath, conns = data["registry"], data["datapath"] or {}, data["connections"]
    attached = ", ".join(f"{a['ifname']} ({a['kind']})" for a in datapath.get("attached", [])) or "none"
    lines = [
        ["node", data["node"]],
        ["up since", f"{data['started']} ({data['uptime_s']:.0f}s), {data['event_loop']} event loop"],
        ["registry", f"{registry['source']} {registry['path']} generation {registry['generation']}: "
                     f"{registry['workloads']} workloads, {registry['services']} services, "
                     f"{registry['registrations']} registrations"],
        ["registry sync", ("connected" if registry["connected"] else "NOT CONNECTED")
                          + f", last current at {registry['synced_at'] or 'never'}"],
        ["registry error", registry["last_error"] or "none"],
        *([["registry notice", registry["notice"]]] if registry.get("notice") else []),
        *([["certificate authority", ca_line(data["ca"])]] if data.get("ca") else []),
        ["outbound listener", data["listeners"]["outbound"]],
        ["captured pods", ", ".join(datapath.get("enrolled_pod_ips", [])) or "none"],
        ["attached to", attached],
        ["pods not routed here", ", ".join(datapath.get("pods_not_routed_here", [])) or "none"],
        ["connections", f"{conns['live']} live, {conns['recently_closed']} recently closed"],
        ["failures", ", ".join(f"{code} {n}" for code, n in sorted(conns["failures"].items())) or "none"],
    ]
    return tabulate(lines, tablefmt="plain")


def ca_line(ca: dict) -> str:
    """Where certificates come from; for the cluster CA, whether it answers and what that means."""
    if ca["mode"] == "local":
        return f"local root CA in {ca['path']} (this node holds the root key: the weaker trust model)"
    if ca["mode"] != "cluster":
        return ca["mode"]
    if ca["last_error"] is None:
        return f"cluster CA {ca['address']}: ok, last certificate at {_iso(ca['last_success'])}"
    if not ca["unanswered"]:  # the CA answers, and refused the latest request (see ameshctl certs)
        return f"cluster CA {ca['address']}: answering; the latest request was refused: {ca['last_error']}"
    return (f"cluster CA {ca['address']}: FAILING since {_iso(ca['failing_since'])}: {ca['last_error']}; the "
            f"certificates held keep serving until they expire (first at {ca['first_expiry'] or 'none held'})")


def _iso(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds)) if seconds is not None else "never"


def workloads(data: list[dict]) -> str:
    rows = [[w["namespace"], w["name"], w["ip"] or "-", w["node"] or "-", w["service_account"], _yes(w["ready"]),
             _yes(w["enrolled"]), _yes(w["captured"]), w["source"]] for w in data]
    return _table(["NAMESPACE", "NAME", "IP", "NODE", "SERVICE ACCOUNT", "READY", "ENROLLED", "CAPTURED HERE",
                   "SOURCE"], rows, "no workloads")


def _endpoint(e: dict, service_source: str) -> str:
    text = e["ip"] + ("" if e["ready"] else " (not ready)")
    if e.get("breaker", "CLOSED") != "CLOSED":
        text += f" [{e['breaker']}]"
    if e.get("connections"):
        text += f" ({e['connections']} live)"
    source = e.get("source") or service_source
    return text + (f" [{source}]" if source != service_source else "")


_DEFAULT_TRAFFIC = dataclasses.asdict(TrafficPolicy())


def _seconds(value: float) -> str:
    return f"{value * 1000:g}ms" if value < 1 else f"{value:g}s"


def _traffic(t: dict) -> str:
    """A Service's configured traffic policy in short: only what differs from the defaults."""
    parts = []
    if t["connect_attempts"] != _DEFAULT_TRAFFIC["connect_attempts"]:
        parts.append(f"attempts {t['connect_attempts']}")
    if t["connection_rate"] is not None:
        parts.append(f"rate {t['connection_rate']:g}/s")
    if t["max_connections"] is not None:
        parts.append(f"max {t['max_connections']} conns")
    if t["connect_timeout"] is not None:
        parts.append(f"timeout {_seconds(t['connect_timeout'])}")
    if t["outlier"] != _DEFAULT_TRAFFIC["outlier"]:
        o = t["outlier"]
        parts.append(f"eject after {o['consecutive_failures']} for {_seconds(o['base_ejection_time'])} "
                     f"(max {o['max_ejection_percent']}%)" if o["consecutive_failures"] else "no ejection")
    if t["load_balancer"] != _DEFAULT_TRAFFIC["load_balancer"]:
        parts.append(t["load_balancer"].lower().replace("_", "-"))
    if t["prefer_close"]:
        parts.append("prefer close")
    if t["split"]:
        parts.append("split " + " / ".join(f"{b['service'].split('/')[1]} {b['weight']}" for b in t["split"]))
    return ", ".join(parts) or "-"


def _live(s: dict) -> tuple[str, str]:
    """A Service's live connections from this node (of its maxConnections) and the connections
    its split sent to each backend, as the admin API counts them."""
    traffic = s["traffic"]
    live = str(s.get("connections", 0))
    if traffic["max_connections"] is not None:
        live += f"/{traffic['max_connections']}"
    split = " / ".join(f"{b['service'].split('/')[1]} {b.get('connections', 0)}" for b in traffic["split"])
    return live, split or "-"


def services(data: list[dict]) -> str:
    rows = []
    warnings = []
    for s in data:
        ports = ", ".join(f"{p['port']}->{p['target_port']}" + (f" ({p['name']})" if p["name"] else "")
                          for p in s["ports"])
        ready = sum(1 for e in s["endpoints"] if e["ready"])
        endpoints = ", ".join(_endpoint(e, s["source"]) for e in s["endpoints"])
        rows.append([s["namespace"], s["name"], s["cluster_ip"] or "None", ports,
                     f"{ready}/{len(s['endpoints'])}", endpoints or "-", *_live(s), _traffic(s["traffic"]),
                     s["source"]])
        warnings += [f"  {s['namespace']}/{s['name']}: {w}" for w in s["traffic"]["warnings"]]
    table = _table(["NAMESPACE", "NAME", "CLUSTER IP", "PORTS", "READY", "ENDPOINTS", "CONNECTIONS", "SPLIT COUNTS",
                    "TRAFFIC", "SOURCE"], rows, "no services")
    return table + ("\n\nnot applied:\n" + "\n".join(warnings) if warnings else "")


def lookup(data: dict) -> str:
    rows = [[e["ip"], ", ".join(f"{name}={port}" for name, port in e["ports"].items()),
             "healthy" if e["ready"] else "unhealthy", e["workload"] or "-", e.get("source") or data["source"]]
            for e in data["endpoints"]]
    head = f"{data['key']} cluster IP {data['cluster_ip'] or 'None'} ({data['source']})"
    return head + "\n\n" + _table(["ADDRESS", "PORTS", "HEALTH", "WORKLOAD", "SOURCE"], rows, "no endpoints")


def connections(data: list[dict]) -> str:
    rows = []
    for c in data:
        destination = c["original_dst"] + (f" ({c['service']})" if c["service"] else "")
        endpoint = (c["upstream"] or "-") + (f" ({c['upstream_workload']})" if c["upstream_workload"] else "")
        failed = [f"{a['upstream']} {a['result']}" for a in c.get("attempts", []) if a["result"] != "ok"]
        if failed and c["state"] != "failed":  # retried: say which endpoints failed before this one
            endpoint += f" after {', '.join(failed)}"
        # the identity at the far end: proved by mTLS for inbound, checked by us for outbound
        peer = c["source_identity"] if c["direction"] == "inbound" else c["destination_identity"]
        reason = "" if c["reason"] in (None, "closed") else c["reason"]
        rows.append([c["id"], c["direction"], c["source_workload"] or "-", c["source_ip"] + (f":{c['source_port']}" if c["source_port"] else ""),
                     destination, endpoint, c["security"] or "-", peer or "-", c["bytes_sent"], c["bytes_received"],
                     *_kernel(c["kernel"]), c["flow"]["packets"] if c.get("flow") else "-", c["started"],
                     f"{c['duration']:.3f}s", c["state"], reason])
    return _table(["ID", "DIR", "SOURCE WORKLOAD", "SOURCE", "DESTINATION", "ENDPOINT", "SECURITY", "PEER IDENTITY",
                   "SENT", "RECEIVED", "RTT", "RETRANS", "PKTS IN", "STARTED", "DURATION", "STATE", "REASON"], rows,
                  "no connections")


def _kernel(kernel: dict) -> tuple[str, str]:
    """The client-facing socket's round-trip time and the retransmits of both sockets."""
    sides = [info for info in kernel.values() if info]
    client = kernel.get("client")
    rtt = f"{client['rtt_ms']:.2f}ms" if client else "-"
    return rtt, str(sum(info["retransmits"] for info in sides)) if sides else "-"


def certs(data: dict) -> str:
    rows = [[c["identity"], c["serial"] or "-", c["not_before"] or "-", c["not_after"] or "-", c["state"],
             _short(c.get("root")), c["last_error"] or ""] for c in data["certificates"]]
    table = _table(["IDENTITY", "SERIAL", "NOT BEFORE", "NOT AFTER", "STATE", "ROOT", "LAST ERROR"], rows,
                   "no certificates")
    lines = [f"trust domain {data['trust_domain']}, root fingerprint (SHA-256) {data['root_fingerprint']}"]
    if data.get("ca"):
        lines.append(f"certificate authority: {ca_line(data['ca'])}")
    lines += [f"  trust bundle: {_short(r['fingerprint'])} {'signs' if r['signing'] else 'trusted'} "
              f"({r['fingerprint']}, until {r['not_after']})" for r in data.get("trust_bundle", [])]
    ca = data.get("ca_directory")
    if ca and ca.get("last_error"):
        lines.append(f"  CA directory {ca['directory']} refused, last good CA kept: {ca['last_error']}")
    bundle = (data.get("ca") or {}).get("trust_bundle")
    if bundle and bundle.get("last_error"):
        lines.append(f"  trust bundle {bundle['file']} refused, last good bundle kept: {bundle['last_error']}")
    return "\n".join(lines) + f"\n\n{table}"


def _short(fingerprint: str | None) -> str:
    return short(fingerprint) if fingerprint else "-"


def flows(data: list[dict]) -> str:
    rows = [[f["src"], f["dst"] + ("" if f["proto"] == "tcp" else f" ({f['proto']})"), f["packets"], f["bytes"],
             f["first_seen"], f["last_seen"], f["flags"] or "-", _yes(f["captured"])] for f in data]
    return _table(["SOURCE", "DESTINATION", "PACKETS", "BYTES", "FIRST SEEN", "LAST SEEN", "FLAGS", "CAPTURED"],
                  rows, "no flows")


def policies(data: dict) -> str:
    rows = [[p["namespace"], p["name"], p["action"], p["scope"], "\n".join(p["rules"]) or "(no rules: matches nothing)",
             "\n".join(p["warnings"]) or "-"] for p in data["authorization_policies"]]
    table = _table(["NAMESPACE", "NAME", "ACTION", "SCOPE", "RULES", "WARNINGS"], rows, "no AuthorizationPolicy")
    modes = [[p["namespace"], p["name"], "workloads with " + ",".join(f"{k}={v}" for k, v in p["selector"].items())
              if p["selector"] else "namespace", p["mode"],
              ", ".join(f"{port}: {mode}" for port, mode in p["port_modes"].items()) or "-"]
             for p in data["peer_authentications"]]
    return (table + "\n\n" + _table(["NAMESPACE", "NAME", "SCOPE", "MTLS", "PORTS"], modes, "no PeerAuthentication")
            + f"\n\nroot namespace (mesh-wide): {data['root_namespace']}")


def check(data: dict) -> str:
    verdict = "ALLOWED" if data["allowed"] else "DENIED"
    lines = [f"{verdict}: {data['reason']}"]
    if data.get("rule"):
        lines.append(f"  decided by {data['policy']} {data['rule']}")
    lines += [f"  {tried}" for tried in data.get("tried", [])]
    lines.append(f"  arrives as {data['arrival']}" + (f" from {data['source_identity']}"
                                                      if data.get("source_identity") else ""))
    if data.get("mtls_mode"):
        lines.append(f"  plaintext to this port: {data['mtls_mode']}")
    lines.append("  policies that apply: " + (", ".join(data["applicable"]) or "none"))
    return "\n".join(lines)
