"""The cluster's health, as the people who run it look for it.

    http://<node>/api/health   this node: roles, each service's state and reason, leader
                               roles held, peers seen, the agent's last pass (JSON)
    http://<VIP>/api/health    the whole cluster (JSON); /api/cluster on any node is the same
    http://<VIP>/status        a page: nodes by services, refreshing itself
    check-cluster              the same on a terminal (exit 1 when anything is unhealthy)

Built from the records every agent publishes in etcd on a lease: a node that is down has
no record, and shows as down. Nothing here holds a secret.
"""

from __future__ import annotations

import html
import http.server
import json
import threading
import time
from typing import Any

from . import record
from .context import Ctx
from .etcd_client import EtcdError

PORT = 80
SERVICE_ORDER = ("nic", "time", "wireguard", "etcd", "vip", "pxe", "ceph", "osd", "munge", "slurmctld", "slurm", "k3s",
                 "backup")
GOOD = ("ok", "off")
FINE = ("ok", "off", "degraded")  # degraded: working, with something to see (a refused disk)


def cluster_view(ctx: Ctx) -> dict[str, Any]:
    """Every node the seed or etcd knows, with its record or as down; what is wrong, in lines."""
    problems: list[str] = []
    try:
        records = record.cluster_records(ctx)
    except EtcdError as exc:
        records = {}
        problems.append(f"etcd unreachable from {ctx.me.name}: {exc}")
    roles = {n.name: [str(r) for r in n.roles] for n in ctx.seed.cluster.nodes}
    names = sorted(set(roles) | set(records), key=_node_order(ctx))
    nodes: list[dict[str, Any]] = []
    for name in names:
        rec = records.get(name)
        if rec is None:
            nodes.append({"node": name, "roles": roles.get(name, []), "up": False, "healthy": False,
                          "services": {}})
            problems.append(f"{name}: down (no health record)")
            continue
        services = rec.get("services", {})
        for service, status in services.items():
            if status.get("state") not in FINE:
                problems.append(f"{name}: {service}: {status.get('state')}: {status.get('reason', '')}")
        nodes.append({**rec, "up": True})
    holders = [n["node"] for n in nodes if n.get("services", {}).get("vip", {}).get("holding")]
    core_up = [n for n in nodes if n["up"] and "core" in n.get("roles", [])]
    if core_up and len(holders) != 1:
        problems.append(f"VIP {ctx.seed.cluster.network.vip} held by {len(holders)} nodes"
                        + (f" ({', '.join(holders)})" if holders else ""))
    return {"cluster": ctx.seed.cluster.name, "vip": str(ctx.seed.cluster.network.vip),
            "vip_holder": holders[0] if len(holders) == 1 else None, "healthy": not problems,
            "problems": problems, "nodes": nodes, "at": round(time.time(), 1)}


def _node_order(ctx: Ctx) -> Any:
    order = {n.name: i for i, n in enumerate(ctx.seed.cluster.nodes)}
    return lambda name: (order.get(name, len(order)), name)


def services_of(view: dict[str, Any]) -> list[str]:
    seen = {s for n in view["nodes"] for s in n.get("services", {})}
    return [s for s in SERVICE_ORDER if s in seen] + sorted(seen - set(SERVICE_ORDER))


def table(view: dict[str, Any]) -> str:
    """The cluster as a text table: nodes by services, then what is wrong."""
    services = services_of(view)
    rows = [["node", "roles", *services]]
    for n in view["nodes"]:
        if not n["up"]:
            rows.append([n["node"], ",".join(n["roles"]), *(["DOWN"] * len(services))])
            continue
        cells = []
        for s in services:
            status = n["services"].get(s, {})
            state = status.get("state", "-")
            cells.append("HOLDS VIP" if s == "vip" and status.get("holding") else state)
        rows.append([n["node"], ",".join(n["roles"]), *cells])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    verdict = "healthy" if view["healthy"] else f"UNHEALTHY ({len(view['problems'])} problems)"
    lines = [f"cluster {view['cluster']}: {verdict}; VIP {view['vip']} on {view['vip_holder'] or 'nobody'}", "",
             *lines]
    details = [f"  {n['node']} {s}: {st.get('reason', '')}" for n in view["nodes"] if n["up"]
               for s, st in n["services"].items() if st.get("state") not in GOOD]
    if details:
        lines += ["", "not ok:", *details]
    if view["problems"]:
        lines += ["", "problems:", *(f"  {p}" for p in view["problems"])]
    return "\n".join(lines) + "\n"


STYLE = """body{font:14px system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:.35em .7em;text-align:left;vertical-align:top}th{background:#f3f3f3}
.ok,.off{background:#e6f4e6}.degraded,.waiting{background:#fff4d6}.failed,.blocked,.down{background:#fbe0e0}
small{color:#666}"""


def page(view: dict[str, Any]) -> str:
    """The status page: one table, refreshing itself, no external script, style or font."""
    services = services_of(view)
    head = "".join(f"<th>{html.escape(s)}</th>" for s in services)
    rows = []
    for n in view["nodes"]:
        cells = []
        for s in services:
            if not n["up"]:
                cells.append('<td class="down">down</td>')
                continue
            st = n["services"].get(s, {"state": "-"})
            label = "holds VIP" if s == "vip" and st.get("holding") else st.get("state", "-")
            cells.append(f'<td class="{html.escape(str(st.get("state")))}" title="{html.escape(st.get("reason", ""))}">'
                         f'{html.escape(str(label))}<br><small>{html.escape(st.get("reason", ""))}</small></td>')
        rows.append(f"<tr><th>{html.escape(n['node'])}<br><small>{html.escape(','.join(n['roles']))}</small></th>"
                    + "".join(cells) + "</tr>")
    problems = "".join(f"<li>{html.escape(p)}</li>" for p in view["problems"]) or "<li>none</li>"
    verdict = "healthy" if view["healthy"] else "unhealthy"
    return (f'<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">'
            f"<title>{html.escape(view['cluster'])}: {verdict}</title><style>{STYLE}</style></head><body>"
            f"<h1>cluster {html.escape(view['cluster'])}: {verdict}</h1>"
            f"<p>VIP {html.escape(view['vip'])} on {html.escape(str(view['vip_holder'] or 'nobody'))}; "
            f"updated {time.strftime('%H:%M:%S', time.gmtime(view['at']))} UTC</p>"
            f"<table><tr><th>node</th>{head}</tr>{''.join(rows)}</table>"
            f"<h2>problems</h2><ul>{problems}</ul></body></html>\n")


def serve(ctx: Ctx, latest: dict[str, Any]) -> http.server.ThreadingHTTPServer:
    """The health API on port 80 of every address of the node (the VIP's too), in a thread."""
    vip = str(ctx.seed.cluster.network.vip)

    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "clusterforge-health"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            on_vip = self.connection.getsockname()[0] == vip
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            if path == "/api/health" and not on_vip:
                return self.reply(200, json.dumps(latest.get("record", {}), indent=2), "application/json")
            if path in ("/api/health", "/api/cluster"):
                return self.reply(200, json.dumps(cluster_view(ctx), indent=2), "application/json")
            if path in ("/status", "/"):
                return self.reply(200, page(cluster_view(ctx)), "text/html; charset=utf-8")
            return self.reply(404, "not found\n", "text/plain")

        def reply(self, code: int, body: str, kind: str) -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(data)

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True

    server = Server(("0.0.0.0", PORT), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="health-api").start()
    return server

