"""etcd snapshots on every core node, and a copy in RBD when Ceph runs.

Every hour each core node saves a snapshot of its own etcd member (`etcdctl snapshot save`)
to /var/lib/clusterforge/backups/etcd-<node>-<UTC time>.db (0600), keeping the newest 24.
When the cluster runs Ceph, the newest also goes into the `rbd` pool as an RBD image of the
same name, the newest three per node kept there: a core node whose disk died leaves its
snapshots behind. The README says how to restore a cluster's etcd from one. The level-
triggered loop takes a snapshot when the newest is older than an hour: a pass in between
does nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ...run import run
from ..seed import Service
from . import host
from .ceph import ADMIN, CONNECT_TIMEOUT, POOL
from .context import ETCD_CLIENT_PORT, Ctx
from .core import Plan, State, Status, Step
from .etcd import ETCDCTL
from .radoslink import RadosError

name = "backup"
needs: tuple[str, ...] = ("etcd",)

EVERY = 3600  # seconds between snapshots
KEEP = 24  # on each core node's disk
KEEP_RBD = 3  # per node, in the rbd pool
PREFIX = "etcd-"
SUFFIX = ".db"
TIMEOUT = 300.0  # a snapshot of a small store takes seconds; an emulated machine under load, more
IN_RBD = ".in-rbd"  # in the backup folder: the name of the snapshot last copied to RBD
FOLDER = "backups"  # in the agent's state folder (/var/lib/clusterforge)


def folder(ctx: Ctx) -> Path:
    return ctx.state_dir / FOLDER


def applies(ctx: Ctx) -> bool:
    return ctx.core and ctx.seed.cluster.enabled(Service.ETCD)


@dataclass(frozen=True)
class Snapshot:
    name: str  # etcd-<node>-<YYYYmmddTHHMMSSZ>.db: sorts by time
    at: float  # when it was saved (its modification time)
    size: int


@dataclass(frozen=True)
class Facts:
    snapshots: tuple[Snapshot, ...]  # oldest first
    in_rbd: str  # the name of the snapshot last copied to RBD ("" when none)
    rbd: str  # "" when the rbd pool takes a copy now, else why not ("off": the cluster runs no Ceph)
    now: float


def facts(ctx: Ctx) -> Facts:
    snaps = []
    for path in sorted(folder(ctx).glob(f"{PREFIX}{ctx.me.name}-*{SUFFIX}")):
        st = path.stat()
        snaps.append(Snapshot(path.name, st.st_mtime, st.st_size))
    in_rbd = (host.read_text(folder(ctx) / IN_RBD) or "").strip()
    rbd = "off"
    if ctx.seed.cluster.enabled(Service.CEPH):
        # Asked only when a copy is due, on the agent's open connection to the monitors.
        rbd = rbd_ready() if snaps and in_rbd != snaps[-1].name else ""
    return Facts(tuple(snaps), in_rbd, rbd, time.time())


def rbd_ready() -> str:
    """"" when every placement group is active and the rbd pool is there (an import would
    otherwise wait for them), else why not."""
    try:
        status = ADMIN.command("status") or {}
        pools = ADMIN.command("osd pool ls") or []
    except RadosError as exc:
        return str(exc)
    pgmap = status.get("pgmap", {})
    active = sum(s.get("count", 0) for s in pgmap.get("pgs_by_state", []) if "active" in s.get("state_name", ""))
    if POOL not in pools or not pgmap.get("num_pgs") or active < pgmap["num_pgs"]:
        return f"the {POOL} pool is not ready ({active} of {pgmap.get('num_pgs', 0)} placement groups active)"
    return ""


def plan(ctx: Ctx, f: Facts) -> Plan:
    newest = f.snapshots[-1] if f.snapshots else None
    if newest is None or f.now - newest.at >= EVERY:
        why = "none yet" if newest is None else f"the newest is {(f.now - newest.at) / 60:.0f} minutes old"
        return [Step("backup: etcd snapshot", why, lambda: save(ctx))]
    if len(f.snapshots) > KEEP:
        old = [s.name for s in f.snapshots[:-KEEP]]
        return [Step("backup: delete old snapshots", f"{len(old)} beyond the newest {KEEP}", lambda: prune(ctx, old))]
    if f.rbd == "" and f.in_rbd != newest.name:
        return [Step("backup: copy the newest snapshot to RBD", newest.name, lambda: to_rbd(ctx, newest.name))]
    return []


def save(ctx: Ctx) -> None:
    host.ensure_dir(folder(ctx), 0o700)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = folder(ctx) / f"{PREFIX}{ctx.me.name}-{stamp}{SUFFIX}"
    # From this node's own member (a snapshot takes one endpoint; given as the wrapper's variable,
    # which etcdctl refuses to see shadowed by a flag); etcdctl writes <name>.part and renames
    # it when the snapshot is whole.
    run([str(ETCDCTL), "snapshot", "save", str(target)], timeout=TIMEOUT,
        env={"ETCDCTL_ENDPOINTS": f"https://127.0.0.1:{ETCD_CLIENT_PORT}"})
    target.chmod(0o600)


def prune(ctx: Ctx, names: list[str]) -> None:
    for name_ in names:
        (folder(ctx) / name_).unlink(missing_ok=True)


def to_rbd(ctx: Ctx, snapshot: str) -> None:
    image = snapshot.removesuffix(SUFFIX)
    ceph = [f"--client_mount_timeout={CONNECT_TIMEOUT}"]  # rbd takes librados' option, not ceph's --connect-timeout
    listed = run(["rbd", *ceph, "ls", POOL], timeout=TIMEOUT).stdout.split()
    if image not in listed:
        run(["rbd", *ceph, "import", str(folder(ctx) / snapshot), f"{POOL}/{image}"], timeout=TIMEOUT)
    mine = sorted({i for i in listed if i.startswith(f"{PREFIX}{ctx.me.name}-")} | {image})
    for old in mine[:-KEEP_RBD]:
        run(["rbd", *ceph, "rm", f"{POOL}/{old}"], timeout=TIMEOUT)
    host.write(folder(ctx) / IN_RBD, snapshot + "\n", 0o600)


def health(ctx: Ctx, f: Facts) -> Status:
    newest = f.snapshots[-1]
    where = "; in RBD too" if f.in_rbd == newest.name else f"; not in RBD yet: {f.rbd}" if f.rbd != "off" else ""
    # The time it was taken, not its age: a reason that changed every minute logged a line a minute.
    taken = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(newest.at))
    return Status(State.OK, f"etcd snapshot taken {taken} ({newest.size // 1024} KiB, "
                            f"{len(f.snapshots)} kept){where}",
                  detail={"newest": newest.name, "in_rbd": f.in_rbd})
