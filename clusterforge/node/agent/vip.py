"""The floating address: keepalived (VRRP, unicast among the core nodes) holds the VIP on
exactly one healthy core node.

VRRP has no quorum of its own: a cut-off node would promote itself. So the instance
tracks a check that passes only while this node's etcd member serves a linearizable read,
which a member outside the majority cannot: a partitioned node drops the VIP instead of
taking it. BACKUP with nopreempt: a node that comes back does not take the VIP back.

The read is the agent's (`watch_majority`, a thread): every few seconds it asks its own
member and, when answered, touches a file; keepalived's check only looks at the file's age.
A check that ran etcdctl itself every 3 s cost each core node a sixth of its CPU under TCG
(a Go process and a TLS handshake each time), which slowed the cluster's forming and, with
reads taking seconds, moved the VIP for no failure.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from ...run import run
from ..seed import Role
from . import host
from .context import RUN_DIR, Ctx
from .core import Plan, State, Status, Step, Wait
from .etcd_client import EtcdClient, EtcdError

name = "vip"
needs: tuple[str, ...] = ("etcd",)

CONFIG = Path("/etc/keepalived/keepalived.conf")
CHECK = Path("/etc/keepalived/etcd-majority")
UNIT = "keepalived.service"
CHECK_SECONDS = 3  # how often keepalived runs the check (it fails 3 times before the VIP moves)
CHECK_TIMEOUT = 10
MAJORITY = RUN_DIR / "etcd-majority"  # touched after each linearizable read the member served
MAJORITY_KEY = "/clusterforge/vip-check"
READ_EVERY = 3.0
# How old the last served read may be: a busy emulated node (an OSD being created) answers in
# seconds, and a slow answer must not move the VIP; a cut-off node drops it within this and
# the check's 3 failures.
FRESH_SECONDS = 30


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


def check_script(stamp: Path = MAJORITY) -> str:
    return ("#!/bin/sh\n# clusterforge: exit 0 only while this node's etcd member is in the majority: the agent\n"
            f"# touches {stamp} each time the member serves it a linearizable read.\n"
            f"stamp=$(stat -c %Y {stamp} 2>/dev/null) || exit 1\n"
            f"[ $(( $(date +%s) - stamp )) -le {FRESH_SECONDS} ]\n")


def read_majority(client: EtcdClient, stamp: Path = MAJORITY) -> bool:
    """One linearizable read from the member the client asks (only one in the majority can
    serve it); when served, stamp's time is now."""
    try:
        client.get(MAJORITY_KEY)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.touch()  # an existing file's time is set to now
    except (EtcdError, OSError):
        return False
    return True


def watch_majority(ctx: Ctx) -> None:
    """The agent's thread on a core node: read_majority from its own member, for ever."""
    client: EtcdClient | None = None
    while True:
        try:
            client = client or EtcdClient(ctx.etcd_endpoints()[:1], ctx.tls, timeout=READ_EVERY * 3)
            read_majority(client)
        except EtcdError:
            pass  # its TLS files cannot be read: no stamp (the etcd service says why), and again
        time.sleep(READ_EVERY)  # the pace keepalived's check is read at


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
