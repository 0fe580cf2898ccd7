"""slurmd on every compute node: configless, and a dynamic node with its real CPUs and memory.

slurmd asks the core nodes in turn for slurm.conf and takes it from whichever runs the
controller (slurmctld.py). The copy lands in SlurmdSpoolDir/conf-cache, which slurmd links
from /run/slurm/conf: there `sinfo`, `srun`, `sbatch` and `squeue` find it, for root with no
flags (core nodes have /etc/slurm/slurm.conf, which the commands read first). Nothing about
the node's hardware is in the inventory: `slurmd -Z` registers what it finds.

A controller that starts without the previous state (no Ceph: a failover) does not know
the dynamic nodes, and slurmd registers only when it starts: a node the controller does
not list a minute after slurmd started is registered again by restarting slurmd.

It needs munge and nothing else: a blocked Ceph (which only the controller's state waits
for) never stops a compute node. Jobs run as root and as the operator account, which
cloud-init makes with the same UID on every node.
"""

from __future__ import annotations

import pwd
import time
from dataclasses import dataclass

from ..seed import OPERATOR, OPERATOR_UID, Role, Service
from . import host
from .context import Ctx
from .core import Plan, State, Status, Step, Wait
from .slurmconf import SLURMD_DROPIN, SLURMD_UNIT, controllers, judge, query_controller, query_nodes, slurmd_dropin

name = "slurm"
needs: tuple[str, ...] = ("munge",)

REGISTER_SECONDS = 60  # slurmd registers within seconds of its start; after this, restart it


def applies(ctx: Ctx) -> bool:
    return ctx.seed.cluster.enabled(Service.SLURM) and ctx.me.has(Role.COMPUTE)


@dataclass(frozen=True)
class Facts:
    dropin: str | None
    unit: host.Unit
    running_for: float  # seconds since slurmd started (0 when it does not run)
    controller: str  # the controller that answers (`scontrol ping`); "" when none does
    controller_why: str
    state: str | None  # this node as the controller sees it (`sinfo`); None when not known
    state_why: str
    operator_uid: int | None  # the operator account's UID on this node; None when it has none


def facts(ctx: Ctx) -> Facts:
    unit = host.units(SLURMD_UNIT)[SLURMD_UNIT]
    controller, controller_why = "", "slurmd does not run"
    state: str | None = None
    state_why = ""
    if unit.running:
        controller, controller_why = query_controller()
        if controller:
            nodes, state_why = query_nodes()
            state = None if nodes is None else nodes.get(ctx.me.name)
            if nodes is not None and state is None:
                state_why = "not registered"
    try:
        uid: int | None = pwd.getpwnam(OPERATOR).pw_uid
    except KeyError:
        uid = None
    return Facts(host.read_text(SLURMD_DROPIN), unit, running_for(unit), controller, controller_why, state,
                 state_why, uid)


def running_for(unit: host.Unit) -> float:
    """Seconds since the unit became active, from systemd's monotonic timestamp (microseconds)."""
    if not unit.running or not unit.since.isdigit() or int(unit.since) == 0:
        return 0.0
    return max(0.0, time.monotonic() - int(unit.since) / 1e6)


def plan(ctx: Ctx, f: Facts) -> Plan:
    wanted = slurmd_dropin(ctx.seed.cluster)
    if f.dropin != wanted:
        names = ", ".join(n for n, _ in controllers(ctx.seed.cluster))
        return [Step("slurm: write slurmd's drop-in", f"configless, a dynamic node; controllers {names}",
                     lambda: write_dropin(wanted, f.unit))]
    if not f.unit.running:
        if f.unit.active == "activating":  # Restart=on-failure between two tries
            return Wait("slurm: slurmd waits for a controller to answer (it tries again every 5 s)")
        why = f"it stopped ({f.unit.result})" if f.unit.active == "failed" else "configured"
        return [Step("slurm: start slurmd", why, lambda: start(f.unit))]
    if f.unit.enabled != "enabled":
        return [Step("slurm: enable slurmd", "it starts at boot and registers again by itself",
                     lambda: host.systemctl("enable", SLURMD_UNIT))]
    if f.controller and f.state is None and f.state_why == "not registered" and f.running_for > REGISTER_SECONDS:
        return [Step("slurm: restart slurmd", f"{f.controller} does not list this node (a controller without the "
                                              "previous state); slurmd registers when it starts",
                     lambda: host.systemctl("restart", SLURMD_UNIT))]
    return []


def write_dropin(text: str, unit: host.Unit) -> None:
    host.write(SLURMD_DROPIN, text, 0o644)
    host.daemon_reload()
    if unit.running:
        host.systemctl("restart", SLURMD_UNIT)


def start(unit: host.Unit) -> None:
    if unit.active == "failed":
        host.systemctl("reset-failed", SLURMD_UNIT)
    host.systemctl("enable", "--now", SLURMD_UNIT)


def health(ctx: Ctx, f: Facts) -> Status:
    me = ctx.me.name
    if not f.controller:
        return Status(State.WAITING, f"slurmd runs; no controller answers yet ({f.controller_why})")
    detail = {"controller": f.controller}
    if f.state is None:
        return Status(State.WAITING, f"slurmd runs; {me} is not registered with {f.controller} yet "
                                     f"({f.state_why})", detail=detail)
    detail["state"] = f.state
    verdict = judge(f.state)
    if verdict == "silent":
        return Status(State.WAITING, f"{f.state}: {f.controller} gets no answer from this slurmd", detail=detail)
    if verdict == "down":
        return Status(State.FAILED, f"{f.state} at {f.controller} (scontrol show node {me} says why)", detail=detail)
    if verdict == "drained":
        return Status(State.DEGRADED, f"{f.state}: drained by an operator "
                                      f"(scontrol update nodename={me} state=resume)", detail=detail)
    if f.operator_uid != OPERATOR_UID:
        return Status(State.DEGRADED, f"{f.state}, but jobs of {OPERATOR} fail here: its UID is "
                                      f"{f.operator_uid} (expected {OPERATOR_UID} on every node)", detail=detail)
    return Status(State.OK, f"{f.state}, registered with {f.controller}", detail=detail)
