"""Ceph without cephadm and without an elected bootstrapper: monitors and managers on the
core nodes, from keys made once on the factory host.

Every core node builds the same monmap from the seed (msgr v2 and v1 on the cluster LAN)
and makes its monitor with a keyring holding every entity (mon., client.admin,
client.bootstrap-osd, mgr.<core node>), so whichever quorum forms first has them all;
mon_initial_members and mon_host keep a monitor from forming a quorum of its own. A
monitor whose store was lost is made again from the live quorum's monmap (and syncs the
rest). Storage nodes get the configuration and the bootstrap-osd key; their disks are
osd.py's. The `rbd` pool is created and initialised by whichever core node gets there
first (every step is idempotent). Keys never pass through argv or etcd: keyrings are
files of mode 0600, written by the agent.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...run import run
from ..seed import CEPH_ADMIN_KEY, CEPH_BOOTSTRAP_OSD_KEY, CEPH_MGR_KEY, CEPH_MON_KEY, Role, Service
from . import host
from .context import Ctx
from .core import Plan, State, Status, Step, Wait
from .radoslink import Link, RadosError, daemon

name = "ceph"
needs: tuple[str, ...] = ("time",)

CONF = Path("/etc/ceph/ceph.conf")
ADMIN_KEYRING = Path("/etc/ceph/ceph.client.admin.keyring")
BOOTSTRAP_OSD_KEYRING = Path("/var/lib/ceph/bootstrap-osd/ceph.keyring")
MON_DIR = Path("/var/lib/ceph/mon")
MGR_DIR = Path("/var/lib/ceph/mgr")
TARGETS = ("ceph.target", "ceph-mon.target", "ceph-mgr.target", "ceph-osd.target")
POOL = "rbd"
POOL_PGS = 32
CONNECT_TIMEOUT = 10  # seconds for a ceph command to find a monitor
COMMAND_TIMEOUT = 45.0
OSD_MEMORY_TARGET = 1024**3  # nodes of 3-4 GiB: an OSD, a monitor and a manager fit
# A cluster-log message a peon forwarded to the leader waits for its answer; one lost in an
# election (frequent on emulated machines under load) stays a "slow op" until the monitor
# restarts (seen with Pacific 16.2.15: SLOW_OPS "oldest is log(1 entries ...)" for good).
STUCK_LOG_SECONDS = 180
SLOW_PING_EMULATED_MS = 5000
# Health checks that are expected with fewer than three storage hosts: said, not failed.
EXPECTED_SMALL = {"POOL_NO_REDUNDANCY"}


def applies(ctx: Ctx) -> bool:
    return ctx.seed.cluster.enabled(Service.CEPH) and (ctx.me.has(Role.CORE) or ctx.me.has(Role.STORAGE))


def storage_hosts(ctx: Ctx) -> int:
    return sum(1 for n in ctx.seed.cluster.nodes if n.has(Role.STORAGE) and n.disks)


def pool_size(ctx: Ctx) -> int:
    return max(1, min(3, storage_hosts(ctx)))


def mon_addrs(ip: object) -> str:
    return f"[v2:{ip}:3300,v1:{ip}:6789]"


def ceph_conf(ctx: Ctx, emulated: bool = False) -> str:
    """The configuration every Ceph node shares; each setting that differs from Ceph's
    defaults says why (the README lists them). `emulated`: the node runs under software
    emulation (QEMU's TCG), where the CPU, not the network, delays heartbeats."""
    c = ctx.seed.cluster
    core = c.with_role(Role.CORE)
    size = pool_size(ctx)
    lines = [
        "# Written by the clusterforge agent.",
        "[global]",
        f"fsid = {c.ceph_fsid}",
        # No monitor forms a quorum alone: the initial members are the seed's core nodes.
        f"mon_initial_members = {', '.join(n.name for n in core)}",
        f"mon_host = {','.join(mon_addrs(n.ip) for n in core)}",
        f"public_network = {c.network.subnet}",
        # Clients must reclaim their global id securely (Ceph warns while the insecure way is allowed).
        "auth_allow_insecure_global_id_reclaim = false",
        # Replicas: one per storage host, up to three.
        f"osd_pool_default_size = {size}",
        f"osd_pool_default_min_size = {1 if size < 3 else 2}",
        # A copy per host needs three hosts; with fewer, copies go to different OSDs.
        f"osd_crush_chooseleaf_type = {1 if storage_hosts(ctx) >= 3 else 0}",
        # Emulated and small machines: clocks drift more than Ceph's 0.05 s default before chrony steps.
        "mon_clock_drift_allowed = 0.5",
        # Small root disks: warn at 10% free, not 30%.
        "mon_data_avail_warn = 10",
        "mon_allow_pool_size_one = true" if size == 1 else "",
        # Under software emulation an OSD's heartbeat takes seconds to be answered (the CPU is
        # emulated, the network is not slow): warn at 5 s there, at Ceph's 1 s on real machines.
        f"mon_warn_on_slow_ping_time = {SLOW_PING_EMULATED_MS}" if emulated else "",
        "",
        "[osd]",
        # Nodes of 3-4 GiB: 1 GiB of cache per OSD instead of 4 GiB.
        f"osd_memory_target = {OSD_MEMORY_TARGET}",
    ]
    return "\n".join(line for line in lines if line != "") + "\n"


def keyring(entities: dict[str, tuple[str, dict[str, str]]]) -> str:
    """A Ceph keyring file: entity -> (key, caps)."""
    out = []
    for entity, (key, caps) in entities.items():
        out.append(f"[{entity}]\n\tkey = {key}\n")
        out += [f'\tcaps {kind} = "{cap}"\n' for kind, cap in sorted(caps.items())]
    return "".join(out)


ADMIN_CAPS = {"mon": "allow *", "osd": "allow *", "mds": "allow *", "mgr": "allow *"}
MGR_CAPS = {"mon": "allow profile mgr", "osd": "allow *", "mds": "allow *"}


def secret(ctx: Ctx, name: str) -> str:
    return (host.read_text(ctx.seed.secret(name)) or "").strip()


def mon_keyring(ctx: Ctx) -> str:
    """Every entity of the cluster, for a new monitor's store: the first quorum has them all."""
    entities: dict[str, tuple[str, dict[str, str]]] = {
        "mon.": (secret(ctx, CEPH_MON_KEY), {"mon": "allow *"}),
        "client.admin": (secret(ctx, CEPH_ADMIN_KEY), ADMIN_CAPS),
    }
    return keyring(entities)


def admin_keyring(ctx: Ctx) -> str:
    return keyring({"client.admin": (secret(ctx, CEPH_ADMIN_KEY), ADMIN_CAPS)})


def mgr_keyring(ctx: Ctx) -> str:
    return keyring({f"mgr.{ctx.me.name}": (secret(ctx, CEPH_MGR_KEY), {})})


def bootstrap_osd_keyring(ctx: Ctx) -> str:
    return keyring({"client.bootstrap-osd": (secret(ctx, CEPH_BOOTSTRAP_OSD_KEY), {})})


@dataclass(frozen=True)
class Facts:
    conf: str | None
    admin_keyring_ok: bool
    bootstrap_keyring_ok: bool
    mon_made: bool  # this node's monitor has a store
    mgr_keyring_ok: bool
    units: dict[str, host.Unit]
    status: dict[str, Any] | None  # `ceph status`, None when no quorum answers
    status_why: str
    pools: tuple[dict[str, Any], ...]  # `ceph osd pool ls detail`
    stuck_log: float = 0.0  # seconds the oldest forwarded cluster-log message has waited on my monitor
    emulated: bool = False  # the machine is emulated (systemd-detect-virt: qemu), not a VM under KVM or metal


def unit_names(ctx: Ctx) -> tuple[str, ...]:
    return (*TARGETS, f"ceph-mon@{ctx.me.name}.service", f"ceph-mgr@{ctx.me.name}.service")


ADMIN = Link("client.admin", ADMIN_KEYRING)


def facts(ctx: Ctx) -> Facts:
    core = ctx.me.has(Role.CORE)
    me = ctx.me.name
    status, why, pools = None, "", ()
    if core and ADMIN_KEYRING.exists():
        try:
            status = ADMIN.command("status")
            pools = tuple(ADMIN.command("osd pool ls", detail="detail") or ())
        except RadosError as exc:
            status, why = None, str(exc)[:200]
    return Facts(
        stuck_log=stuck_log(me, status) if core else 0.0,
        emulated=host.emulated(),
        conf=host.read_text(CONF),
        admin_keyring_ok=not core or host.file_is(ADMIN_KEYRING, admin_keyring(ctx), 0o600),
        bootstrap_keyring_ok=not ctx.me.has(Role.STORAGE) or host.file_is(
            BOOTSTRAP_OSD_KEYRING, bootstrap_osd_keyring(ctx), 0o600, "ceph"),
        mon_made=core and (MON_DIR / f"ceph-{me}" / "store.db").is_dir(),
        mgr_keyring_ok=not core or host.file_is(MGR_DIR / f"ceph-{me}" / "keyring", mgr_keyring(ctx), 0o600, "ceph"),
        units=host.units(*unit_names(ctx)) if core else host.units(*TARGETS),
        status=status, status_why=why, pools=pools,
    )


def stuck_log(me: str, status: dict[str, Any] | None) -> float:
    """How long my monitor has held its oldest forwarded cluster-log message: asked of its
    admin socket only while Ceph reports slow ops on it."""
    slow = ((status or {}).get("health") or {}).get("checks", {}).get("SLOW_OPS")
    if not slow or not re.search(rf"mon\.{re.escape(me)}\b", json.dumps(slow)):
        return 0.0
    try:
        ops = daemon(f"mon.{me}", "ops") or {}
    except RadosError:
        return 0.0
    return max((float(op.get("age", 0)) for op in ops.get("ops", [])
                if str(op.get("description", "")).startswith("log(")), default=0.0)


def plan(ctx: Ctx, f: Facts) -> Plan:
    me = ctx.me.name
    steps: list[Step] = []
    conf = ceph_conf(ctx, f.emulated)
    if f.conf != conf:
        steps.append(Step("ceph: write ceph.conf", "monitors, network and settings from the seed",
                          lambda: host.write(CONF, conf, 0o644)))
    if not f.admin_keyring_ok:
        steps.append(Step("ceph: install the admin keyring", "`ceph` works for root on core nodes",
                          lambda: host.write(ADMIN_KEYRING, admin_keyring(ctx), 0o600)))
    if not f.bootstrap_keyring_ok:
        steps.append(Step("ceph: install the bootstrap-osd key", "storage nodes create their OSDs with it",
                          lambda: host.write(BOOTSTRAP_OSD_KEYRING, bootstrap_osd_keyring(ctx), 0o600, "ceph")))
    disabled = [t for t in TARGETS if f.units[t].enabled != "enabled"]
    if disabled:
        steps.append(Step("ceph: enable the ceph targets", "daemons come back by themselves after a reboot",
                          lambda: host.systemctl("enable", *disabled)))
    if steps or not ctx.me.has(Role.CORE):
        return steps
    if not f.mon_made:
        return [Step("ceph: make my monitor", "from the live quorum's monmap if there is one, else the seed's",
                     lambda: make_monitor(ctx))]
    mon = f.units[f"ceph-mon@{me}.service"]
    if not mon.running or mon.enabled != "enabled":
        return [Step("ceph: start my monitor", restart_reason(mon), lambda: start(f"ceph-mon@{me}.service", mon))]
    if f.status is None:
        core = len(ctx.seed.cluster.with_role(Role.CORE))
        return Wait(f"waiting for a monitor quorum ({core // 2 + 1} of {core} monitors): {f.status_why}")
    if f.stuck_log >= STUCK_LOG_SECONDS:
        return [Step("ceph: restart my monitor", f"a cluster-log message it forwarded has waited {f.stuck_log:.0f} s "
                                                 "for the leader (lost in an election: a slow op until it restarts)",
                     lambda: host.systemctl("restart", f"ceph-mon@{me}.service"))]
    if not f.mgr_keyring_ok:  # registered with the quorum first
        return [Step("ceph: install my manager's key", f"mgr.{me}", lambda: install_mgr(ctx))]
    mgr = f.units[f"ceph-mgr@{me}.service"]
    if not mgr.running or mgr.enabled != "enabled":
        return [Step("ceph: start my manager", restart_reason(mgr), lambda: start(f"ceph-mgr@{me}.service", mgr))]
    return plan_pool(ctx, f)


def restart_reason(unit: host.Unit) -> str:
    return f"it stopped ({unit.result})" if unit.active == "failed" else "configured"


def start(unit: str, state: host.Unit) -> None:
    if state.active == "failed":  # past its start limit, systemd would refuse to try again
        host.systemctl("reset-failed", unit)
    host.systemctl("enable", "--now", unit)


def plan_pool(ctx: Ctx, f: Facts) -> Plan:
    pools = {p.get("pool_name"): p for p in f.pools}
    size = pool_size(ctx)
    pool = pools.get(POOL)
    if pool is None:
        return [Step("ceph: create the rbd pool", f"{POOL_PGS} placement groups, {size} replicas",
                     lambda: run(["ceph", "osd", "pool", "create", POOL, str(POOL_PGS), "--size", str(size)],
                                 timeout=COMMAND_TIMEOUT))]
    if pool.get("size") != size:
        extra = ["--yes-i-really-mean-it"] if size == 1 else []
        return [Step("ceph: set the rbd pool's replicas", f"{pool.get('size')} -> {size}",
                     lambda: run(["ceph", "osd", "pool", "set", POOL, "size", str(size), *extra],
                                 timeout=COMMAND_TIMEOUT))]
    osdmap = (f.status or {}).get("osdmap", {})
    up = osdmap.get("osdmap", osdmap).get("num_up_osds", 0)
    if "rbd" not in (pool.get("application_metadata") or {}) and up >= min(size, 2):
        # It writes to the pool: only once enough OSDs are up for its placement groups to be active.
        return [Step("ceph: initialise the rbd pool", "RBD images live there",
                     lambda: run(["rbd", "pool", "init", POOL], timeout=COMMAND_TIMEOUT))]
    return []


def make_monitor(ctx: Ctx) -> None:
    """ceph-mon --mkfs, as user ceph, from the live monmap when a quorum answers (a monitor
    whose store was lost), else from the seed (the cluster is forming)."""
    me = ctx.me.name
    host.ensure_dir(Path("/var/lib/ceph/tmp"), 0o750, "ceph")
    with tempfile.TemporaryDirectory(dir="/var/lib/ceph/tmp", prefix="mkfs-") as tmp:
        work = Path(tmp)
        host.ensure_dir(work, 0o700, "ceph")
        monmap, keys = work / "monmap", work / "keyring"
        host.write(keys, mon_keyring(ctx) + bootstrap_entities(ctx), 0o600, "ceph")
        live = run(["ceph", f"--connect-timeout={CONNECT_TIMEOUT}", "mon", "getmap", "-o", str(monmap)],
                   check=False, timeout=COMMAND_TIMEOUT)
        if live.returncode != 0:
            args = ["monmaptool", "--create", "--fsid", ctx.seed.cluster.ceph_fsid]
            for n in ctx.seed.cluster.with_role(Role.CORE):
                args += ["--addv", n.name, mon_addrs(n.ip)]
            run([*args, "--clobber", str(monmap)])
        os.chown(monmap, *host.ids("ceph"))
        run(["ceph-mon", "--mkfs", "-i", me, "--monmap", str(monmap), "--keyring", str(keys),
             "--setuser", "ceph", "--setgroup", "ceph"], timeout=COMMAND_TIMEOUT)


def bootstrap_entities(ctx: Ctx) -> str:
    """The rest of the auth database: bootstrap-osd and every core node's manager."""
    entities: dict[str, tuple[str, dict[str, str]]] = {}
    osd_key = secret(ctx, CEPH_BOOTSTRAP_OSD_KEY)
    if osd_key:
        entities["client.bootstrap-osd"] = (osd_key, {"mon": "profile bootstrap-osd", "mgr": "allow r"})
    return keyring(entities) + mgr_entities(ctx)


def mgr_entities(ctx: Ctx) -> str:
    # A core node's seed holds only its own manager key; the others' managers register
    # theirs when they start (auth get-or-create with the admin key).
    return keyring({f"mgr.{ctx.me.name}": (secret(ctx, CEPH_MGR_KEY), MGR_CAPS)})


def install_mgr(ctx: Ctx) -> None:
    me = ctx.me.name
    directory = MGR_DIR / f"ceph-{me}"
    host.ensure_dir(directory, 0o750, "ceph")
    # Registered with the monitors (idempotent: the same key and caps each time).
    host.ensure_dir(Path("/var/lib/ceph/tmp"), 0o750, "ceph")
    with tempfile.TemporaryDirectory(dir="/var/lib/ceph/tmp", prefix="mgr-") as tmp:
        keys = Path(tmp) / "keyring"
        host.write(keys, keyring({f"mgr.{me}": (secret(ctx, CEPH_MGR_KEY), MGR_CAPS)}), 0o600)
        run(["ceph", f"--connect-timeout={CONNECT_TIMEOUT}", "auth", "import", "-i", str(keys)],
            timeout=COMMAND_TIMEOUT)
    host.write(directory / "keyring", mgr_keyring(ctx), 0o600, "ceph")


def health(ctx: Ctx, f: Facts) -> Status:
    if not ctx.me.has(Role.CORE):
        return Status(State.OK, "configured (the core nodes report the cluster's health)")
    s = f.status or {}
    quorum = s.get("quorum_names", [])
    checks = (s.get("health") or {}).get("checks") or {}
    osdmap = s.get("osdmap", {})
    osdmap = osdmap.get("osdmap", osdmap)  # nested in some releases
    osds = f"{osdmap.get('num_up_osds', 0)} of {osdmap.get('num_osds', 0)} OSDs up, {osdmap.get('num_in_osds', 0)} in"
    detail = {"health": (s.get("health") or {}).get("status", "?"), "quorum": quorum,
              "osds": {k: osdmap.get(k, 0) for k in ("num_osds", "num_up_osds", "num_in_osds")},
              "checks": {k: (v.get("summary") or {}).get("message", "") for k, v in checks.items()}}
    status = detail["health"]
    expected = EXPECTED_SMALL if storage_hosts(ctx) < 3 else set()
    unexpected = {k: m for k, m in detail["checks"].items() if k not in expected}
    if status == "HEALTH_OK" or (status == "HEALTH_WARN" and not unexpected):
        why = ""
        if detail["checks"]:
            why = f"; expected with {storage_hosts(ctx)} storage host(s): " + "; ".join(detail["checks"].values())
        return Status(State.OK, f"{status}, quorum {','.join(quorum)}, {osds}{why}", detail=detail)
    problems = "; ".join(f"{k}: {m}" for k, m in unexpected.items())
    state = State.FAILED if status == "HEALTH_ERR" else State.DEGRADED
    return Status(state, f"{status}: {problems} ({osds})", detail=detail)
