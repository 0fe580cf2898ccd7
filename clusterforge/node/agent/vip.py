"""The floating address: keepalived (VRRP, unicast among the core nodes) holds the VIP on
exactly one healthy core node.

VRRP has no quorum of its own: a cut-off node would promote itself. So the instance
tracks a check that passes only while this node's etcd member serves a linearizable read,
which a member outside the majority cannot: a partitioned node drops the VIP instead of
taking it. BACKUP with nopreempt: a node that comes back does not take the VIP back.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

from ...run import run
from ..seed import Role
from . import host
from .context import Ctx
from .core import Plan, State, Status, Step, Wait

name = "vip"
needs: tuple[str, ...] = ("etcd",)

CONFIG = Path("/etc/keepalived/keepalived.conf")
CHECK = Path("/etc/keepalived/etcd-majority")
UNIT = "keepalived.service"
# How often keepalived runs the check, and how long it may take: a busy emulated node
# (an OSD being created) answers slowly, and a slow answer must not move the VIP.
CHECK_SECONDS = 3
CHECK_TIMEOUT = 10


def applies(ctx: Ctx) -> bool:
    return ctx.core


@dataclass(frozen=True)
class Facts:
    config: str | None
    check: str | None
    unit: host.Unit
    interface: str  # the NIC with this node's MAC
    holding: bool  # the VIP is on this node


def lan_interface(mac: str) -> str:
    for dev in sorted(Path("/sys/class/net").iterdir()):
        address = host.read_text(dev / "address")
        if address is not None and address.strip().lower() == mac:
            return dev.name
    return ""


def facts(ctx: Ctx) -> Facts:
    vip = str(ctx.seed.cluster.network.vip)
    out = run(["ip", "-j", "-4", "addr", "show"], check=False).stdout
    addresses = {a.get("local") for e in json.loads(out or "[]") for a in e.get("addr_info", [])}
    return Facts(host.read_text(CONFIG), host.read_text(CHECK), host.units(UNIT)[UNIT],
                 lan_interface(ctx.me.mac), vip in addresses)


def router_id(cluster: str) -> int:
    """VRRP's router id (1-255), the same on every core node of a cluster and different, most
    likely, from another cluster's on the same LAN."""
    return zlib.crc32(cluster.encode()) % 255 + 1


def check_script() -> str:
    # etcdctl (the agent's wrapper: endpoints and certificate) against the local member
    # only: a linearizable read needs the majority.
    return ("#!/bin/sh\n# clusterforge: exit 0 only while this node's etcd member is in the majority.\n"
            "ETCDCTL_ENDPOINTS=https://127.0.0.1:2379 exec /usr/local/bin/etcdctl --command-timeout=8s "
            "get --consistency=l /clusterforge/vip-check >/dev/null 2>&1\n")


def keepalived_conf(ctx: Ctx, interface: str) -> str:
    net = ctx.seed.cluster.network
    core = list(ctx.seed.cluster.with_role(Role.CORE))
    me = ctx.me
    # Equal priorities would make the VRRP election fall to the highest address; a node's
    # place in the inventory decides instead, the same way on every node.
    priority = 150 - [n.name for n in core].index(me.name)
    peers = "\n".join(f"        {n.ip}" for n in core if n.name != me.name)
    return f"""# Written by the clusterforge agent.
global_defs {{
    router_id {me.name}
    enable_script_security
    script_user root
}}

vrrp_script etcd_majority {{
    script "{CHECK}"
    interval {CHECK_SECONDS}
    timeout {CHECK_TIMEOUT}
    fall 3
    rise 2
}}

vrrp_instance cluster_vip {{
    state BACKUP
    nopreempt
    interface {interface}
    virtual_router_id {router_id(ctx.seed.cluster.name)}
    priority {priority}
    advert_int 1
    unicast_src_ip {me.ip}
    unicast_peer {{
{peers}
    }}
    virtual_ipaddress {{
        {net.vip}/{net.subnet.prefixlen} dev {interface}
    }}
    track_script {{
        etcd_majority
    }}
}}
"""


def plan(ctx: Ctx, f: Facts) -> Plan:
    if not f.interface:
        return Wait(f"waiting for a network interface with this node's MAC {ctx.me.mac}")
    steps: list[Step] = []
    if f.check != check_script():
        steps.append(Step("vip: write the majority check", "the VIP follows the etcd majority",
                          lambda: host.write(CHECK, check_script(), 0o755)))
    wanted = keepalived_conf(ctx, f.interface)
    if f.config != wanted:
        def write() -> None:
            host.write(CONFIG, wanted, 0o644)
            if f.unit.running:
                host.systemctl("reload", UNIT)
        steps.append(Step("vip: write keepalived.conf", "unicast VRRP among the core nodes", write))
    if steps:
        return steps
    if not f.unit.running or f.unit.enabled != "enabled":
        return [Step("vip: start keepalived", "configured", lambda: host.systemctl("enable", "--now", UNIT))]
    return []


def health(ctx: Ctx, f: Facts) -> Status:
    vip = ctx.seed.cluster.network.vip
    if f.holding:
        return Status(State.OK, f"holding the VIP {vip}", detail={"holding": True})
    return Status(State.OK, f"standby for the VIP {vip}", detail={"holding": False})
