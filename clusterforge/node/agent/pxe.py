"""The cluster's own PXE, on the core nodes, from what `./forge cluster.publish` put there.

Every core node serves the published files over HTTP on port 8080 (a thread of the agent,
node/pxeserve.py's handler, the factory's too): the boot URL is on the VIP, so whichever core
node holds it answers, and each keeps its own copy of everything, so losing a core node loses
no ability to boot. DHCP (full or proxy, as the published network.pxe says) and TFTP of
Debian's iPXE come from dnsmasq on exactly one core node, the holder of the "pxe-dhcp"
election: never two DHCP servers for one pool. Its unit (clusterforge-dnsmasq.service) is
never enabled, so a node that reboots starts no DHCP server before it has won the role; a
node that does not hold the role stops dnsmasq before anything else, and a holder that finds
its lease gone between passes stops it at once (lost(), loop.ON_LOST).

The installed set and the discovery list are in etcd, so whichever core node answers knows
them. Every node running from its disk records itself installed once (a marker on its disk
keeps it from doing so again after `pxe.reinstall --on-cluster` removed it): a node installed
any way (disk image, ISO, USB, the factory's PXE) that network-boots from the cluster is told
to boot its disk, never to install again.
"""

from __future__ import annotations

import datetime
import json
import threading
from dataclasses import dataclass
from pathlib import Path

from .. import pxepublish
from .. import seed as seedlib
from ..pxeserve import (
    HTTP_PORT,
    IPXE_DIR,
    MAC_HYPHEN,
    BootNode,
    HttpServer,
    Served,
    StoreError,
    make_handler,
    merged,
    over_cap,
    report_mac,
    sanitized,
)
from ..seed import BootMode, PxeMode, Service
from . import host
from .context import Ctx
from .core import Plan, State, Status, Step, Wait
from .etcd_client import EtcdClient, EtcdError
from .vip import lan_interface

name = "pxe"
needs: tuple[str, ...] = ()  # its stop path runs whatever else is blocked; the election needs etcd itself

ELECTION = "pxe-dhcp"
UNIT = "clusterforge-dnsmasq.service"
CONFIG = Path("/etc/clusterforge/pxe/dnsmasq.conf")
INSTALLED = "/clusterforge/pxe/installed/"  # <aa-bb-cc-dd-ee-ff> -> when and by whom
DISCOVERED = "/clusterforge/pxe/discovered/"  # <aa:bb:cc:dd:ee:ff> -> the machine's record (JSON)
SERVING = (PxeMode.DHCP, PxeMode.PROXY)


def root(ctx: Ctx) -> Path:
    """Where cluster.publish puts the files (pxepublish.ROOT on a node)."""
    return ctx.state_dir / pxepublish.ROOT.name


def marker(ctx: Ctx) -> Path:
    return ctx.state_dir / "pxe-installed"


def leases(ctx: Ctx) -> Path:
    return ctx.state_dir / "pxe-dhcp.leases"


def applies(ctx: Ctx) -> bool:
    return ctx.seed.cluster.enabled(Service.ETCD)


@dataclass(frozen=True)
class Facts:
    published: str | None  # the published inventory.json; None: nothing published
    published_conf: str | None  # the published pxe/dnsmasq.conf (DHCP, static leases, boot URL)
    config: str | None  # what dnsmasq runs with
    unit: host.Unit
    interface: str  # the NIC with this node's MAC
    serving: bool  # this agent's HTTP server runs
    leader: bool  # this node holds the pxe-dhcp election (confirmed in etcd this pass)
    holding: bool  # it held the role before this pass (to give it up when nothing is to be served)
    holder: str  # who holds it when this node does not ("" nobody, or unknown)
    why: str  # why this node does not hold it
    marked: bool  # this node recorded itself installed (the marker on its disk)
    recorded: bool | None = None  # (not marked) etcd has it installed; None: not asked, or etcd did not answer


def published_cluster(text: str | None) -> seedlib.ClusterSeed | None:
    """The cluster as published (every node); raises ValueError when it cannot be read."""
    if text is None:
        return None
    try:
        return seedlib.ClusterSeed.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError, seedlib.SeedError) as exc:
        raise ValueError(f"the published inventory.json cannot be read ({type(exc).__name__}): publish again") \
            from None


def installed_key(ctx: Ctx) -> str:
    return INSTALLED + ctx.me.mac.replace(":", "-")


def facts(ctx: Ctx) -> Facts:
    marked = marker(ctx).exists()
    recorded = None
    if not marked and ctx.me.boot == BootMode.INSTALL:
        try:
            recorded = ctx.etcd.get(installed_key(ctx)) is not None
        except EtcdError:
            pass  # etcd is not there yet (the cluster forming): the next pass asks again
    if not ctx.core:
        return Facts(None, None, None, host.Unit(UNIT, "", "", "", ""), "", False, False, False, "", "", marked,
                     recorded)
    top = root(ctx)
    cluster = ctx.seed.cluster.name
    published = published_conf = None
    if pxepublish.read_manifest(top) is not None:
        published = host.read_text(top / cluster / "inventory.json")
        published_conf = host.read_text(top / cluster / "pxe" / "dnsmasq.conf")
    try:
        seen = published_cluster(published)
        mode = seen.network.pxe if seen is not None else None
    except ValueError:
        mode = None
    election = ctx.election(ELECTION)
    holding = election.token is not None
    leader = mode in SERVING and election.campaign()
    why = election.why if mode in SERVING else "nothing to serve"
    holder = ""
    if mode in SERVING and not leader:
        try:
            current = election.leader()
            holder = current[0] if current else ""
        except EtcdError:
            pass
    return Facts(published, published_conf, host.read_text(CONFIG), host.units(UNIT)[UNIT],
                 lan_interface(ctx.me.mac), _server is not None, leader, holding, holder, why, marked, recorded)


def dnsmasq_config(ctx: Ctx, published_conf: str, interface: str) -> str:
    """The published configuration (DHCP per network.pxe, the static leases, the boot URL on
    the VIP) and where this node serves it."""
    return (published_conf.rstrip("\n") + "\n"
            f"# Added by the clusterforge agent on {ctx.me.name}: where it serves.\n"
            f"interface={interface}\n"
            "bind-dynamic\n"  # the VIP may come to this interface after dnsmasq started
            "except-interface=lo\n"
            f"tftp-root={IPXE_DIR}\n"
            f"dhcp-leasefile={leases(ctx)}\n"
            "pid-file=\n")  # systemd keeps track of it


def active(unit: host.Unit) -> bool:
    return unit.active not in ("", "inactive", "failed")


def plan(ctx: Ctx, f: Facts) -> Plan:
    steps: list[Step] = []
    if ctx.me.boot == BootMode.INSTALL and not f.marked and f.recorded is not None:
        steps.append(Step("pxe: record this node as installed", "a network boot from the cluster then boots its disk",
                          lambda: mark_installed(ctx, put=not f.recorded)))
    if not ctx.core:
        return steps
    try:
        seen = published_cluster(f.published)
        problem = ""
    except ValueError as exc:
        seen, problem = None, str(exc)
    mode = seen.network.pxe if seen is not None else None
    dhcp = mode in SERVING
    if active(f.unit) and not (dhcp and f.leader):  # first, before anything else
        why = (f"this node does not hold the DHCP role: {f.why}" if dhcp else
               "network.pxe is off" if mode == PxeMode.OFF else problem or "nothing is published")
        return [Step("pxe: stop dnsmasq", why, lambda: host.systemctl("stop", UNIT))]
    if f.holding and not dhcp:
        steps.append(Step("pxe: give up the DHCP role", "network.pxe is off" if mode == PxeMode.OFF
                          else "nothing is published", lambda: resign(ctx)))
    if problem:
        return Wait(f"pxe: {problem}") if not steps else steps
    if f.published is None:
        return steps
    if not f.serving:
        steps.append(Step("pxe: serve HTTP", f"the published files, on port {HTTP_PORT}", lambda: serve(ctx)))
    if steps or not (dhcp and f.leader):
        return steps
    if f.published_conf is None:
        return Wait("pxe: the published files have no pxe/dnsmasq.conf: publish again")
    if not f.interface:
        return Wait(f"pxe: waiting for a network interface with this node's MAC {ctx.me.mac}")
    wanted = dnsmasq_config(ctx, f.published_conf, f.interface)
    if f.config != wanted:
        running = f.unit.running
        return [Step("pxe: write dnsmasq's config", f"{mode} mode, the published static leases",
                     lambda: write_config(wanted, running))]
    if not f.unit.running:
        why = f"it stopped ({f.unit.result})" if f.unit.active == "failed" else "this node holds the DHCP role"
        return [Step("pxe: start dnsmasq", why, lambda: start(f.unit))]
    return []


def health(ctx: Ctx, f: Facts) -> Status:
    if not ctx.core:
        return Status(State.OFF, "the core nodes serve PXE")
    seen = published_cluster(f.published)
    if seen is None:
        return Status(State.OFF, "nothing published yet (./forge cluster.publish)")
    mode = seen.network.pxe
    if mode not in SERVING:
        return Status(State.OFF, "network.pxe is off")
    served = f"HTTP on port {HTTP_PORT}; DHCP ({mode}) and TFTP"
    if f.leader:
        return Status(State.OK, f"{served} on this node", detail={"dhcp": ctx.me.name})
    if f.holder:
        return Status(State.OK, f"{served} on {f.holder}", detail={"dhcp": f.holder})
    return Status(State.WAITING, f"no core node holds the DHCP role yet ({f.why})", detail={"dhcp": None})


# ---------------------------------------------------------------- steps


def write_config(text: str, restart: bool) -> None:
    host.write(CONFIG, text, 0o644)
    if restart:  # dnsmasq reads its static leases and ranges at start only
        host.systemctl("restart", UNIT)


def start(unit: host.Unit) -> None:
    if unit.active == "failed":
        host.systemctl("reset-failed", UNIT)
    host.systemctl("start", UNIT)  # never enable: after a reboot, only a won election starts it


def lost(ctx: Ctx) -> None:
    """For a keepalive that finds the lease gone between passes: no second DHCP server, now."""
    host.systemctl("stop", UNIT)


def resign(ctx: Ctx) -> None:
    try:
        ctx.election(ELECTION).resign()
    except EtcdError:
        pass  # the lease runs out by itself


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def mark_installed(ctx: Ctx, put: bool) -> None:
    """Once per installation: `pxe.reinstall --on-cluster` removes the key, and this node (still
    running until it is rebooted into its new install) must not put it back."""
    if put:
        ctx.etcd.put(installed_key(ctx), json.dumps({"by": f"agent on {ctx.me.name}", "at": now()}))
    host.ensure_dir(ctx.state_dir, 0o755)
    host.write(marker(ctx), f"{now()}\n")


# ---------------------------------------------------------------- the HTTP side

_server: HttpServer | None = None
_server_lock = threading.Lock()


def say(line: str) -> None:
    print(f"pxe: {line}", flush=True)  # the agent's standard output is its journal


def serve(ctx: Ctx) -> None:
    """Port 8080 on every address of the node (the VIP's too), in a thread of the agent."""
    global _server
    with _server_lock:
        if _server is not None:
            return
        source = Publication(root(ctx), ctx.seed.cluster.name)
        handler = make_handler(source.current, EtcdInstalled(ctx.etcd), EtcdDiscoveries(ctx.etcd), say)
        server = HttpServer(("0.0.0.0", HTTP_PORT), handler)
        threading.Thread(target=server.serve_forever, daemon=True, name="pxe-http").start()
        _server = server


class Publication:
    """What the published files say is to be served, read again whenever the manifest changes
    (a publish writes it last)."""

    def __init__(self, top: Path, cluster: str):
        self.top = top
        self.cluster = cluster
        self._key: tuple[int, int, int] | None = None
        self._served: Served | None = None
        self._lock = threading.Lock()

    def current(self) -> Served | None:
        try:
            st = (self.top / pxepublish.MANIFEST).stat()
        except OSError:
            return None
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        with self._lock:
            if key != self._key:
                self._served, self._key = self._load(), key
            return self._served

    def _load(self) -> Served | None:
        try:
            seen = published_cluster(host.read_text(self.top / self.cluster / "inventory.json"))
        except ValueError as exc:
            say(str(exc))
            return None
        if seen is None or seen.network.pxe not in SERVING:
            return None
        nodes = tuple(BootNode(n.name, n.mac.replace(":", "-"), str(n.ip), n.boot == BootMode.DISKLESS)
                      for n in seen.nodes)
        roots = {self.cluster: self.top / self.cluster, pxepublish.IMAGES: self.top / pxepublish.IMAGES}
        return Served(self.cluster, nodes, roots, seeds_by_address=seen.network.pxe == PxeMode.DHCP)


class EtcdInstalled:
    """The installed set in etcd: one key per MAC, written by the installer's report (through
    any core node) or by the node's own agent."""

    def __init__(self, etcd: EtcdClient):
        self.etcd = etcd

    def all(self) -> set[str]:
        try:
            kvs = self.etcd.get_prefix(INSTALLED)
        except EtcdError as exc:
            raise StoreError(f"cannot read the installed nodes from etcd: {exc}") from None
        return {mac for kv in kvs if MAC_HYPHEN.fullmatch(mac := kv.key.removeprefix(INSTALLED))}

    def add(self, mac_hyphen: str) -> None:
        try:
            self.etcd.put(INSTALLED + mac_hyphen, json.dumps({"by": "its installer", "at": now()}))
        except EtcdError as exc:
            raise StoreError(f"cannot record the install in etcd: {exc}") from None


class EtcdDiscoveries:
    """The discovery list in etcd, one key per MAC, checked and capped as the factory's is."""

    def __init__(self, etcd: EtcdClient):
        self.etcd = etcd
        self._lock = threading.Lock()

    def load(self) -> dict[str, dict[str, str]]:
        records = {}
        for kv in self.etcd.get_prefix(DISCOVERED):
            try:
                records[kv.key.removeprefix(DISCOVERED)] = json.loads(kv.value)
            except ValueError:
                continue
        return sanitized(records)

    def record(self, report: dict[str, str]) -> str | None:
        mac = report_mac(report)
        if mac is None:
            return None
        try:
            with self._lock:
                seen = self.load()
                seen[mac] = merged(seen.get(mac), report)
                self.etcd.put(DISCOVERED + mac, json.dumps(seen[mac], sort_keys=True))
                for old in over_cap(seen):
                    self.etcd.delete(DISCOVERED + old)
        except EtcdError as exc:
            raise StoreError(f"cannot record the machine in etcd: {exc}") from None
        return mac
