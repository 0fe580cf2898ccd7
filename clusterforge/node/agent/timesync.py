"""Time: chrony on every node. The core nodes serve the cluster (from upstream servers
where they are reachable, otherwise from each other, in orphan mode); the others follow
the core nodes. Clocks step after any jump (a paused and resumed machine): Ceph's monitors
refuse skew over half a second."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...run import run
from ..seed import Role
from . import host
from .context import Ctx
from .core import Plan, State, Status, Step

name = "time"
needs: tuple[str, ...] = ()

CONFIG = Path("/etc/chrony/chrony.conf")
UNIT = "chrony.service"
UPSTREAM = "2.debian.pool.ntp.org"


def applies(ctx: Ctx) -> bool:
    return True


@dataclass(frozen=True)
class Facts:
    config: str | None
    unit: host.Unit
    tracking: dict[str, str]  # chronyc tracking, field -> value


def facts(ctx: Ctx) -> Facts:
    unit = host.units(UNIT)[UNIT]
    tracking: dict[str, str] = {}
    if unit.running:
        out = run(["chronyc", "-n", "tracking"], check=False, timeout=10).stdout
        tracking = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}
    return Facts(host.read_text(CONFIG), unit, tracking)


def chrony_conf(ctx: Ctx) -> str:
    core = [n for n in ctx.seed.cluster.with_role(Role.CORE) if n.name != ctx.me.name]
    lines = ["# Written by the clusterforge agent.",
             "driftfile /var/lib/chrony/chrony.drift",
             # Step whenever the clock is off by more than a second, not only at start:
             # a paused and resumed machine comes back seconds or minutes behind.
             "makestep 1 -1",
             "rtcsync",
             "maxupdateskew 100.0"]
    if ctx.core:
        lines += [f"pool {UPSTREAM} iburst"]
        lines += [f"peer {n.ip} iburst" for n in core]
        lines += ["# No upstream reachable: the core nodes agree among themselves.",
                  "local stratum 10 orphan",
                  f"allow {ctx.seed.cluster.network.subnet}"]
    else:
        lines += [f"server {n.ip} iburst" for n in ctx.seed.cluster.with_role(Role.CORE)]
    return "\n".join(lines) + "\n"


def plan(ctx: Ctx, f: Facts) -> Plan:
    wanted = chrony_conf(ctx)
    if f.config != wanted:
        def apply() -> None:
            host.write(CONFIG, wanted)
            host.systemctl("enable", UNIT)
            host.systemctl("restart", UNIT)
        return [Step("time: write chrony.conf", "core nodes serve time, the others follow them", apply)]
    if not f.unit.running or f.unit.enabled != "enabled":
        return [Step("time: start chrony", "configured", lambda: host.systemctl("enable", "--now", UNIT))]
    return []


def health(ctx: Ctx, f: Facts) -> Status:
    leap = f.tracking.get("Leap status", "")
    if leap != "Normal":
        return Status(State.WAITING, f"clock not synchronised yet ({leap or 'no answer from chronyd'})")
    reference = f.tracking.get("Reference ID", "?")
    if reference.startswith("7F7F0101"):  # chrony's LOCAL reference: orphan mode
        return Status(State.OK, "serving its own clock to the cluster (no upstream server reachable)")
    return Status(State.OK, f"synchronised to {reference.split('(')[-1].rstrip(')') or reference}")
