"""`./forge verify`: boot the inventory as a QEMU cluster (or use the running one), wait for it
to form, check every service from inside the nodes, and write the report."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..inventory import Role
from ..log import info
from ..vm.cluster import ClusterVMs
from . import checks, report

# Power-on to formed, under TCG on two cores (13-25 minutes for three nodes measured): the
# machines share the host's cores, so a larger cluster takes longer. Then what is pending is named.
FORMATION_BASE, FORMATION_PER_NODE = 1200.0, 300.0
POLL = 10.0


@dataclass
class Outcome:
    ok: bool
    json: Path
    html: Path
    results: list[checks.Result]
    formed_after: float | None


def cluster_view(vms: ClusterVMs) -> dict[str, Any] | None:
    """check-cluster --json's view, from the first core node's agent that answers on /api/cluster:
    over HTTP, so that watching a forming cluster starts no process on its busy nodes (check-cluster
    over SSH cost the node it ran on about a sixth of its CPU, polled every 10 s under TCG)."""
    for node in vms.cluster.with_role(Role.CORE):
        if not vms.machine(node).running:
            continue
        body = vms.net.http_get(f"http://{node.ip}/api/cluster", timeout=60)
        try:
            return json.loads(body or "")  # type: ignore[no-any-return]
        except ValueError:
            continue  # no answer, or not the health API's
    return None


def formation_timeout(vms: ClusterVMs) -> float:
    return FORMATION_BASE + FORMATION_PER_NODE * len(vms.cluster.nodes)


def last_passes(view: dict[str, Any] | None) -> dict[str, float]:
    """node -> when its agent last finished a pass (its clock), as its record in view says."""
    return {n["node"]: float(n.get("last_pass", {}).get("at", 0)) for n in (view or {}).get("nodes", [])}


def wait_formed(vms: ClusterVMs, since: float, timeout: float | None = None,
                after: dict[str, float] | None = None) -> tuple[float | None, dict[str, Any]]:
    """Until check-cluster says healthy; prints what is still pending as it changes. after (node ->
    last_passes' value): healthy only on records newer than these, so that a fault just undone is
    judged by passes made since, not by records from before it."""
    deadline = time.monotonic() + (timeout or formation_timeout(vms))
    said = ""
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        view = cluster_view(vms) or {"healthy": False, "problems": ["no core node answers yet"]}
        passes = last_passes(view)
        stale = [name for name, at in (after or {}).items() if passes.get(name, 0) <= at]
        if view.get("healthy") and not stale:
            return time.monotonic() - since, view
        if stale:
            view = {**view, "problems": [*view.get("problems", []), f"no pass since the fault was undone: "
                                                                     f"{', '.join(stale)}"]}
        pending = "; ".join(view.get("problems", [])[:4])
        if pending != said:
            info(f"  forming ({time.monotonic() - since:.0f}s): {pending}")
            said = pending
        time.sleep(POLL)  # the agents converge at their own pace
    return None, view


def boot_timeline(vms: ClusterVMs) -> dict[str, dict[str, float]]:
    path = vms.dir / "timeline.json"
    return json.loads(path.read_text()) if path.exists() else {}  # type: ignore[no-any-return]


def verify(vms: ClusterVMs, out: Path, keep: bool = False, faults: bool = False) -> Outcome:
    was_running = all(vms.machine(n).running for n in vms.cluster.nodes)
    start = time.monotonic()
    try:
        if was_running:
            info(f"verify: cluster {vms.cluster.name} is running; checking it as it is")
        else:
            info(f"verify: booting cluster {vms.cluster.name}")
            vms.up()
        formed_after, view = wait_formed(vms, start)
        if formed_after is None:
            info(f"verify: not formed within {formation_timeout(vms):.0f}s: " + "; ".join(view.get("problems", [])))
        else:
            info(f"verify: formed {formed_after:.0f}s after {'the check began' if was_running else 'power-on'}")

        def progress(r: checks.Result) -> None:
            info(f"  {r.status:<7} {r.name} ({r.seconds:.0f}s)" + (f": {r.reason}" if r.status != "pass" else ""))

        results = checks.run_all(vms, progress=progress)
        records = {n["node"]: n for n in (cluster_view(vms) or {}).get("nodes", [])}
        boot = boot_timeline(vms)
        if faults and not any(r.status == "fail" for r in results):
            from .faults import run_faults

            results += run_faults(vms, progress=progress)
        events = report.timeline(boot, records)
        power_on = min((p.get("at", 0) for p in boot.values()), default=0)
        fault_lane = {}
        for r in results:
            if r.service == "faults" and power_on:
                label = r.name.split(":")[0]
                fault_lane[label] = round(r.started - power_on, 1)
                if "recovery_seconds" in r.extra:
                    fault_lane[f"{label} healthy"] = round(r.started - power_on + r.seconds, 1)
        if fault_lane:
            events["faults"] = fault_lane
        figures: dict[str, Any] = {"power-on to all healthy (s)": None if formed_after is None or was_running
                                   else round(formed_after)}
        paths = report.write(out, vms.cluster.name, [r.to_dict() for r in results], events, figures)
        ok = formed_after is not None and not any(r.status == "fail" for r in results)
        print(table(results), file=sys.stdout)
        return Outcome(ok, paths[0], paths[1], results, formed_after)
    finally:
        if not (was_running or keep):
            vms.down()


def table(results: list[checks.Result]) -> str:
    width = max(len(r.name) for r in results)
    lines = [f"{'check':<{width}}  result   why"]
    lines += [f"{r.name:<{width}}  {r.status:<7}  {r.reason}" for r in results]
    return "\n".join(lines)
