"""One OSD per inventory disk on storage nodes, and no disk wiped by surprise.

A listed disk is used when it is blank, or when it already holds an OSD of this cluster
(a reboot, a reinstalled node): bluestore through `ceph-volume lvm`, whose
ceph-volume@lvm unit activates the OSD again at every boot. A disk with a partition
table, a filesystem, LVM, another cluster's OSD, or one that is mounted or in use, is left
untouched and reported, unless the inventory allows it (`wipe: true`). A mounted or busy
disk is never wiped, whatever the inventory says.

ceph-volume takes a minute or more on a slow machine, so it runs as a transient unit
(`clusterforge-osd-<disk>`) that later passes watch; the loop never blocks on it.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ...run import run
from ..seed import Role, Service
from . import host
from .ceph import BOOTSTRAP_OSD_KEYRING, COMMAND_TIMEOUT
from .context import Ctx
from .core import Plan, State, Status, Step, Wait
from .radoslink import Link

BOOTSTRAP = Link("client.bootstrap-osd", BOOTSTRAP_OSD_KEYRING)
name = "osd"
# Not "ceph": the pool waits for OSDs, so OSDs must not wait for the pool. An OSD needs the
# configuration and the monitors, which facts() checks itself (the bootstrap-osd key answers).
needs: tuple[str, ...] = ("time",)

LOG_LINES = 3


def applies(ctx: Ctx) -> bool:
    return ctx.seed.cluster.enabled(Service.CEPH) and ctx.me.has(Role.STORAGE) and bool(ctx.me.disks)


@dataclass(frozen=True)
class Disk:
    path: str  # as the inventory names it
    device: str  # what it resolves to ("" when it does not exist)
    wipe: bool
    holds: tuple[str, ...]  # what is on it: "a gpt partition table", "an ext4 filesystem", ...
    busy: str  # "" or why it is in use: "mounted at /x", "held by another process"
    osd: tuple[int, str, str] | None  # (osd id, osd fsid, cluster fsid) of a ceph-volume OSD on it
    osd_running: bool
    job: host.Unit  # the transient unit that creates (or zaps) it
    job_log: tuple[str, ...]  # its last lines when it failed


@dataclass(frozen=True)
class Facts:
    disks: tuple[Disk, ...]
    quorum: bool  # the monitors answer the bootstrap-osd key
    quorum_why: str


def job_unit(device: str, action: str) -> str:
    return f"clusterforge-osd-{action}-{Path(device).name}.service"


def ceph_volumes() -> dict[str, tuple[int, str, str]]:
    """device -> (osd id, osd fsid, cluster fsid), from the tags ceph-volume puts on its LVs
    (lvs answers in milliseconds where `ceph-volume lvm list` takes seconds)."""
    out = run(["lvs", "--reportformat", "json", "-o", "lv_tags,devices"], check=False).stdout
    found: dict[str, tuple[int, str, str]] = {}
    for report in json.loads(out or '{"report": []}').get("report", []):
        for lv in report.get("lv", []):
            tags = dict(t.split("=", 1) for t in lv.get("lv_tags", "").split(",") if "=" in t)
            if tags.get("ceph.type") != "block" or "ceph.osd_id" not in tags:
                continue
            for dev in lv.get("devices", "").split(","):
                if dev:
                    found[os.path.realpath(dev.split("(")[0])] = (
                        int(tags["ceph.osd_id"]), tags.get("ceph.osd_fsid", ""), tags.get("ceph.cluster_fsid", ""))
    return found


def facts(ctx: Ctx) -> Facts:
    by_device = ceph_volumes()
    disks = []
    for d in ctx.me.disks:
        device = os.path.realpath(d.path) if os.path.exists(d.path) else ""
        osd = by_device.get(device) if device else None
        units = host.units(job_unit(device or d.path, "create"), job_unit(device or d.path, "zap"),
                           *([f"ceph-osd@{osd[0]}.service"] if osd else []))
        job = next((u for u in list(units.values())[:2] if u.active in ("active", "activating", "failed")),
                   units[job_unit(device or d.path, "create")])
        log: tuple[str, ...] = ()
        if job.active == "failed":
            out = run(["journalctl", "-u", job.name, "-n", str(LOG_LINES), "-o", "cat", "--no-pager"],
                      check=False).stdout
            log = tuple(out.strip().splitlines())
        disks.append(Disk(
            path=d.path, device=device, wipe=d.wipe,
            holds=contents(device) if device and osd is None else (),
            busy=in_use(device) if device and osd is None else "",
            osd=osd, osd_running=osd is not None and units[f"ceph-osd@{osd[0]}.service"].running,
            job=job, job_log=log))
    # Asked only when a disk waits for an OSD: the monitors answer the bootstrap-osd key.
    waiting = any(d.device and d.osd is None and not d.busy and (d.wipe or not d.holds) for d in disks)
    why = BOOTSTRAP.reachable() if waiting else ""
    return Facts(tuple(disks), not why, why)


def contents(device: str) -> tuple[str, ...]:
    """What a disk holds: libblkid's own probe of the device (udev not needed), the partitions
    and volumes the kernel sees on it, and any other signature wipefs finds."""
    found: list[str] = []
    probe = dict(line.split("=", 1) for line in run(["blkid", "-p", "-o", "export", device], check=False)
                 .stdout.splitlines() if "=" in line)
    if probe.get("PTTYPE"):
        found.append(f"a {probe['PTTYPE']} partition table")
    kind = probe.get("TYPE", "")
    if kind == "LVM2_member":
        found.append("LVM")
    elif kind:
        what = "filesystem" if probe.get("USAGE") == "filesystem" else "signature"
        found.append(f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} {what}")
    info = json.loads(run(["lsblk", "--json", "-o", "NAME", device], check=False).stdout or '{"blockdevices": []}')
    children = sum(len(dev.get("children") or ()) for dev in info.get("blockdevices", []))
    if children:
        found.append(f"{children} partition(s) or volume(s)")
    signatures = json.loads(run(["wipefs", "--json", "--no-act", device], check=False).stdout
                            or '{"signatures": []}')
    for sig in signatures.get("signatures", []):
        other = sig.get("type", "?")
        if other not in (kind, probe.get("PTTYPE"), "LVM2_member"):
            found.append(f"a {other} signature")
    return tuple(dict.fromkeys(found))


def in_use(device: str) -> str:
    """Why the disk must not be touched now: mounted, or held open by someone."""
    mounts = run(["findmnt", "-rn", "-S", device, "-o", "TARGET"], check=False).stdout.split()
    if mounts:
        return f"mounted at {mounts[0]}"
    holders = Path("/sys/class/block") / Path(device).name / "holders"
    if holders.is_dir() and any(holders.iterdir()):
        return f"in use by {', '.join(p.name for p in holders.iterdir())}"
    try:
        if not stat.S_ISBLK(os.stat(device).st_mode):
            return "not a block device"
        fd = os.open(device, os.O_RDONLY | os.O_EXCL)  # fails with EBUSY while anyone holds it
        os.close(fd)
    except OSError as exc:
        return "held by another process" if exc.errno == errno.EBUSY else f"cannot be opened ({exc.strerror})"
    return ""


def plan(ctx: Ctx, f: Facts) -> Plan:
    fsid = ctx.seed.cluster.ceph_fsid
    waits = []
    for d in f.disks:
        if d.job.active in ("active", "activating"):
            waits.append(f"{d.path}: {'erasing' if '-zap-' in d.job.name else 'creating an OSD'} (ceph-volume running)")
            continue
        if not d.device or d.osd is not None and d.osd[2] != fsid:
            continue  # reported by health()
        if d.osd is not None:
            if not d.osd_running:
                osd_id, osd_fsid, _ = d.osd
                return [Step(f"osd: activate osd.{osd_id}", f"on {d.path}, not running",
                             partial(activate, osd_id, osd_fsid))]
            continue
        if d.busy:
            continue  # never touched, whatever the inventory says
        if d.holds and not d.wipe:
            continue
        if d.job.active == "failed" and d.job.result != "success":
            continue  # reported; `systemctl reset-failed <unit>` retries
        if not f.quorum:
            waits.append(f"{d.path}: waiting for the monitors ({f.quorum_why})")
            continue
        if d.holds:
            return [Step(f"osd: erase {d.path}", f"wipe: true, and it holds {', '.join(d.holds)}",
                         partial(job, d.device, "zap", ["ceph-volume", "lvm", "zap", "--destroy", d.device]))]
        return [Step(f"osd: create an OSD on {d.path}", "blank disk",
                     partial(job, d.device, "create", ["ceph-volume", "lvm", "create", "--bluestore", "--data",
                                                       d.device]))]
    if waits:
        return Wait("; ".join(waits))
    return []


def job(device: str, action: str, argv: list[str]) -> None:
    unit = job_unit(device, action)
    run(["systemctl", "reset-failed", unit], check=False)
    # --no-block: a oneshot's start job lasts as long as its command; the pass goes on.
    run(["systemd-run", f"--unit={unit}", "--no-block", "--collect", "--service-type=oneshot",
         f"--description=clusterforge: ceph-volume {action} {device}", *argv])


def activate(osd_id: int, osd_fsid: str) -> None:
    run(["systemctl", "reset-failed", f"ceph-osd@{osd_id}.service"], check=False)
    run(["ceph-volume", "lvm", "activate", str(osd_id), osd_fsid], timeout=COMMAND_TIMEOUT)


def health(ctx: Ctx, f: Facts) -> Status:
    fsid = ctx.seed.cluster.ceph_fsid
    used, refused = [], []
    for d in f.disks:
        if not d.device:
            refused.append(f"{ctx.me.name} {d.path}: no such disk")
        elif d.osd is not None and d.osd[2] != fsid:
            refused.append(f"{ctx.me.name} {d.path}: holds an OSD of another cluster ({d.osd[2]}); not used; "
                           "set wipe: true to let clusterforge erase it")
        elif d.osd is not None:
            used.append(f"osd.{d.osd[0]} on {d.path}")
        elif d.busy:
            refused.append(f"{ctx.me.name} {d.path}: {d.busy}; never erased while in use")
        elif d.job.active == "failed":
            refused.append(f"{ctx.me.name} {d.path}: ceph-volume failed: {' / '.join(d.job_log) or d.job.result}")
        elif d.holds:
            refused.append(f"{ctx.me.name} {d.path}: has {', '.join(d.holds)}; not used; set wipe: true to let "
                           "clusterforge erase it")
    detail = {"osds": used, "refused": refused}
    if refused:
        return Status(State.DEGRADED, "; ".join(refused + used), detail=detail)
    return Status(State.OK, ", ".join(used) or "no OSD", detail=detail)
