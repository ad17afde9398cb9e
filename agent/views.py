"""Tables for people: the admin API's JSON rendered for `ameshctl ... -o table`. Pure functions."""

from __future__ import annotations

from tabulate import tabulate


def _table(headers: list[str], rows: list[list[object]], empty: str) -> str:
    return tabulate(rows, headers=headers, tablefmt="plain", disable_numparse=True) if rows else empty


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def status(data: dict) -> str:
    registry, datapath, conns = data["registry"], data["datapath"] or {}, data["connections"]
    attached = ", ".join(f"{a['ifname']} ({a['kind']})" for a in datapath.get("attached", [])) or "none"
    lines = [
        ["node", data["node"]],
        ["up since", f"{data['started']} ({data['uptime_s']:.0f}s)"],
        ["registry", f"{registry['source']} {registry['path']} generation {registry['generation']}: "
                     f"{registry['workloads']} workloads, {registry['services']} services"],
        ["registry error", registry["last_error"] or "none"],
        ["outbound listener", data["listeners"]["outbound"]],
        ["captured pods", ", ".join(datapath.get("enrolled_pod_ips", [])) or "none"],
        ["attached to", attached],
        ["pods without interface", ", ".join(datapath.get("unresolved_pod_ips", [])) or "none"],
        ["connections", f"{conns['live']} live, {conns['recently_closed']} recently closed"],
    ]
    return tabulate(lines, tablefmt="plain")


def workloads(data: list[dict]) -> str:
    rows = [[w["namespace"], w["name"], w["ip"] or "-", w["node"], w["service_account"], _yes(w["ready"]),
             _yes(w["enrolled"]), _yes(w["captured"]), w["source"]] for w in data]
    return _table(["NAMESPACE", "NAME", "IP", "NODE", "SERVICE ACCOUNT", "READY", "ENROLLED", "CAPTURED HERE",
                   "SOURCE"], rows, "no workloads")


def services(data: list[dict]) -> str:
    rows = []
    for s in data:
        ports = ", ".join(f"{p['port']}->{p['target_port']}" + (f" ({p['name']})" if p["name"] else "")
                          for p in s["ports"])
        ready = sum(1 for e in s["endpoints"] if e["ready"])
        endpoints = ", ".join(e["ip"] + ("" if e["ready"] else " (not ready)") for e in s["endpoints"])
        rows.append([s["namespace"], s["name"], s["cluster_ip"] or "None", ports,
                     f"{ready}/{len(s['endpoints'])}", endpoints or "-"])
    return _table(["NAMESPACE", "NAME", "CLUSTER IP", "PORTS", "READY", "ENDPOINTS"], rows, "no services")


def connections(data: list[dict]) -> str:
    rows = []
    for c in data:
        source = c["source_workload"] or "-"
        destination = c["original_dst"] + (f" ({c['service']})" if c["service"] else "")
        endpoint = (c["upstream"] or "-") + (f" ({c['upstream_workload']})" if c["upstream_workload"] else "")
        reason = "" if c["reason"] in (None, "closed") else c["reason"]
        rows.append([c["id"], source, f"{c['source_ip']}:{c['source_port']}", destination, endpoint,
                     c["bytes_sent"], c["bytes_received"], c["started"], f"{c['duration']:.3f}s", c["state"],
                     reason])
    return _table(["ID", "SOURCE WORKLOAD", "SOURCE", "DESTINATION", "ENDPOINT", "SENT", "RECEIVED", "STARTED",
                   "DURATION", "STATE", "REASON"], rows, "no connections")
