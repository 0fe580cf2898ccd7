"""The controller's state (StateSaveLocation) on an RBD image that follows the elected node.

Only the node holding the slurmctld election maps the image, and it fences whoever may
still hold it first: a paused holder cannot step down, so every client still watching or
locking the image is blocklisted (`ceph osd blocklist add`), and only then is the image
mapped with its exclusive lock held for good (`-o exclusive`, no automatic hand-over; a
client of its own, `noshare`, so that only this mapping is ever fenced). A fenced holder's
writes fail: the state cannot be written by two controllers.

First use makes the image (1 GiB, layering and exclusive-lock) and its ext4 filesystem;
a device holding any filesystem or signature is never formatted. Every mount is checked
(e2fsck) first, and the state records the fencing token that mounted it last: an older
holder that got this far anyway refuses to mount it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ...run import CommandError, run
from . import host
from .ceph import POOL
from .core import StepFailed
from .slurmconf import STATE_DIR, last_line

IMAGE = "slurmctld-state"
SPEC = f"{POOL}/{IMAGE}"
SIZE = "1G"
FEATURES = ("layering", "exclusive-lock")  # what krbd supports; the lock is what fencing relies on
MAP_OPTIONS = "exclusive,noshare,lock_timeout=60"
FS = "ext4"
# errors=remount-ro: a fenced device's errors stop writes at once. dirsync: slurmctld fsyncs
# each state file, then links it into place; with the links written at once too, the state
# a controller saved survives its power-off (with ext4's 5 s commit it could be lost).
MOUNT_OPTIONS = "noatime,dirsync,errors=remount-ro"
HOLDER = ".clusterforge-holder"  # in the state: "<node> <fencing token>" of the last mount
TIMEOUT = 90.0  # a command that changes something; map waits up to lock_timeout for the lock
# A command that reads. Under emulation, on a busy node, the ceph and rbd commands spend 10-30 s
# starting (`ceph osd blocklist ls`: 30.5 s, 8.8 s of it CPU, with HEALTH_OK, run 17); at 30 s
# every pass timed out and the elected node never started the controller.
PROBE_TIMEOUT = 90.0
CONNECT_TIMEOUT = 10  # seconds for `ceph` to find a monitor
SYSFS = Path("/sys/bus/rbd/devices")


@dataclass(frozen=True)
class Image:
    """The state image as Ceph sees it (read by the elected node before it maps it)."""

    exists: bool
    watchers: tuple[str, ...]  # client addresses with a watch on it (`rbd status`)
    lockers: tuple[str, ...]  # client addresses holding its lock (`rbd lock ls`)
    blocklisted: tuple[str, ...]  # every blocklisted client address (`ceph osd blocklist ls`)


def normal(address: str) -> str:
    """v1:10.0.0.11:0/1234 and 10.0.0.11:0/1234 are the same client."""
    for prefix in ("v1:", "v2:", "any:"):
        if address.startswith(prefix):
            return address[len(prefix):]
    return address


def unfenced(image: Image) -> list[str]:
    """Clients that may still write to the image: watching or locking it, not blocklisted."""
    fenced = {normal(a) for a in image.blocklisted}
    found: list[str] = []
    for address in (*image.watchers, *image.lockers):
        if normal(address) not in fenced and normal(address) not in {normal(a) for a in found}:
            found.append(address)
    return found


# ---------------------------------------------------------------- facts (reads)


def mapped() -> tuple[str, ...]:
    """/dev/rbdN of every mapping of the state image on this node (from sysfs: no Ceph needed)."""
    devices = []
    for dev in sorted(SYSFS.glob("*")) if SYSFS.is_dir() else []:
        try:
            pool, image = (dev / "pool").read_text().strip(), (dev / "name").read_text().strip()
        except OSError:
            continue
        if (pool, image) == (POOL, IMAGE):
            devices.append(f"/dev/rbd{dev.name}")
    return tuple(devices)


def mounted(path: Path = STATE_DIR) -> str:
    """The device mounted at path, "" when nothing is."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return ""
    source = ""
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[1] == str(path):
            source = fields[0]  # the last one listed is the one on top
    return source


def fs_type(device: str) -> str:
    """The signature on a device ("ext4"), "" when it holds none at all."""
    proc = run(["blkid", "-p", "-o", "export", device], check=False, timeout=30)
    if proc.returncode == 2:  # blkid: nothing found
        return ""
    if proc.returncode != 0:
        raise CommandError(["blkid", "-p", "-o", "export", device], proc.returncode, proc.stdout + proc.stderr)
    values = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return values.get("TYPE") or values.get("PTTYPE") or "unknown signature"


def image() -> tuple[Image | None, str]:
    """The image, its watchers and lockers, and the blocklist; None and why when Ceph does not tell."""
    try:
        # `ceph` gives up on the monitors after its connect timeout (rbd would wait minutes).
        # Ceph 16 prints two JSON lists back to back: the address blocklist, then the range blocklist.
        out = run(["ceph", f"--connect-timeout={CONNECT_TIMEOUT}", "osd", "blocklist", "ls", "--format", "json"],
                  timeout=PROBE_TIMEOUT).stdout
        blocklist = [entry for value in json_values(out) if isinstance(value, list) for entry in value]
        blocklisted = tuple(str(b.get("addr", "")) for b in blocklist if isinstance(b, dict) and b.get("addr"))
        info = run(["rbd", "info", SPEC, "--format", "json"], check=False, timeout=PROBE_TIMEOUT)
        if info.returncode != 0:
            if "error opening image" in info.stderr and "No such file or directory" in info.stderr:
                return Image(False, (), (), blocklisted), ""
            return None, last_line(Exception(info.stderr or info.stdout))
        status = json.loads(run(["rbd", "status", SPEC, "--format", "json"], timeout=PROBE_TIMEOUT).stdout or "{}")
        locks = json.loads(run(["rbd", "lock", "ls", SPEC, "--format", "json"], timeout=PROBE_TIMEOUT).stdout or "[]")
    except CommandError as exc:
        return None, unanswered(exc)
    except ValueError as exc:
        return None, f"unreadable answer: {exc}"
    if isinstance(locks, dict):  # older releases: {lock id: {locker, address}}
        locks = list(locks.values())
    return Image(
        exists=True,
        watchers=tuple(str(w.get("address", "")) for w in status.get("watchers", []) if w.get("address")),
        lockers=tuple(str(lk.get("address", "")) for lk in locks if lk.get("address")),
        blocklisted=blocklisted,
    ), ""


def unanswered(exc: CommandError) -> str:
    """Why Ceph did not tell: `ceph` timing out finds no monitor quorum; `rbd` timing out
    (the monitors answered just before) waits on the pool, whose placement groups are not
    active while too few OSDs are up."""
    if exc.code is not None:
        return last_line(exc)
    if Path(exc.argv[0]).name == "rbd":
        return f"rbd did not answer within {PROBE_TIMEOUT:.0f}s (the rbd pool has no active placement group yet?)"
    return "no monitor quorum answers"


def json_values(text: str) -> list[object]:
    """Every JSON value in text, one after another (some Ceph commands print several)."""
    decoder, values, at = json.JSONDecoder(), [], 0
    text = text.strip()
    while at < len(text):
        value, end = decoder.raw_decode(text, at)
        values.append(value)
        at = end
        while at < len(text) and text[at].isspace():
            at += 1
    return values


def holder_token() -> int | None:
    """The fencing token recorded in the mounted state, None when there is none."""
    try:
        return int((STATE_DIR / HOLDER).read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None


# ---------------------------------------------------------------- actions (one each)


def create() -> None:
    features = [arg for f in FEATURES for arg in ("--image-feature", f)]
    run(["rbd", "create", "--size", SIZE, *features, SPEC], timeout=TIMEOUT)


def fence(addresses: list[str]) -> None:
    for address in addresses:
        run(["ceph", "osd", "blocklist", "add", address], timeout=TIMEOUT)


def map_image() -> None:
    run(["rbd", "device", "map", "-o", MAP_OPTIONS, SPEC], timeout=TIMEOUT)


def mkfs(device: str) -> None:
    if fs_type(device):  # looked at again right before: never format what holds anything
        raise StepFailed(f"{device} is not blank any more; not formatting it")
    run(["mkfs.ext4", "-q", "-L", "slurmctld", "-m", "0", device], timeout=TIMEOUT)


def mount(device: str, node: str, token: int) -> None:
    """e2fsck, mount, and check the fencing token the state was last mounted with."""
    check = run(["e2fsck", "-p", device], check=False, timeout=300)
    if check.returncode >= 4:  # 0: clean, 1-2: repaired; 4 and up: errors left, or e2fsck failed
        raise StepFailed(f"e2fsck -p {device} exited {check.returncode}: {last_line(Exception(check.stdout))}; "
                         f"repair it by hand (e2fsck {device}) on the elected node")
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    run(["mount", "-t", FS, "-o", MOUNT_OPTIONS, device, str(STATE_DIR)], timeout=TIMEOUT)
    seen = holder_token()
    if seen is not None and seen > token:
        unmount()
        raise StepFailed(f"the state was mounted with fencing token {seen}, newer than mine ({token}): "
                         "another node holds the controller role")
    host.write(STATE_DIR / HOLDER, f"{node} {token}\n", 0o644)


def unmount() -> None:
    if run(["umount", str(STATE_DIR)], check=False, timeout=TIMEOUT).returncode != 0:
        # Busy or its device fenced: detach it now; the kernel lets go when the last user does.
        run(["umount", "-l", str(STATE_DIR)], timeout=TIMEOUT)


def unmap(device: str) -> None:
    if run(["rbd", "device", "unmap", device], check=False, timeout=TIMEOUT).returncode != 0:
        run(["rbd", "device", "unmap", "-o", "force", device], timeout=TIMEOUT)
