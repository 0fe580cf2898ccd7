"""The bare-metal installer: runs in the live system booted from the ISO, the USB stick
or PXE (kernel command line `clusterforge.mode=install`).

It finds this machine's seed by MAC address, chooses the target disk by a fixed rule,
writes the image, puts the seed into the installed system and reboots into it. An
unknown MAC writes nothing and says so on the console.

Runs with the image's own Python: standard library only.
"""

from __future__ import annotations

import fcntl
import gzip
import http.client
import io
import json
import os
import re
import stat
import struct
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..log import UserError
from ..run import CommandError, run
from . import seed as seedlib
from .agent import k3s
from .layout import NOCLOUD_SEED_DIR, ROOT_PARTITION
from .seed import NOCLOUD_FILES

MEDIUM = Path("/run/live/medium")  # where live-boot mounts the ISO or USB stick
MIN_DISK = 4 * 1024**3
CHUNK = 4 * 1024**2
RESUME_ATTEMPTS = 20  # a broken image download picked up again this often (each after the server is back)
RESUME_PAUSE = 3.0  # seconds before picking it up: a moving address settles on its new node
CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+)")


class InstallError(Exception):
    pass


def say(message: str) -> None:
    """To the journal and the console (the unit sends standard output to both)."""
    print(f"clusterforge-installer: {message}", flush=True)


def kernel_args(cmdline: str) -> dict[str, str]:
    args = {}
    for word in cmdline.split():
        key, _, value = word.partition("=")
        if key.startswith("clusterforge."):
            args[key.removeprefix("clusterforge.")] = value
    return args


def local_macs() -> list[str]:
    macs = []
    for dev in sorted(Path("/sys/class/net").iterdir()):
        if (dev / "device").exists():  # physical NICs only
            macs.append((dev / "address").read_text().strip().lower())
    return macs


# ------------------------------------------------------------------ sources

def _open(location: str, attempts: int = 30) -> IO[bytes]:
    if not location.startswith(("http://", "https://")):
        return open(location, "rb")
    return _fetch(urllib.request.Request(location), attempts)


def _fetch(request: urllib.request.Request, attempts: int = 30) -> IO[bytes]:
    for attempt in range(attempts):
        try:
            return urllib.request.urlopen(request, timeout=60)  # type: ignore[no-any-return]  # noqa: S310 - the boot server's URL
        except urllib.error.HTTPError:
            raise  # the server answered: retrying will not change its mind
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(2)  # the network may still be coming up after the switch to the live root
    raise AssertionError("unreachable")


class Download:
    """A file over HTTP, read from start to end. A connection that breaks (the address served
    from moved to another core node, a server restarted) is opened again from where it broke,
    with a Range request: the image is not fetched again from its start. What the pieces make
    is checked by gzip's CRC at the end of the image."""

    def __init__(self, url: str, attempts: int = RESUME_ATTEMPTS):
        self.url = url
        self.attempts = attempts
        self.at = 0
        self.response: IO[bytes] | None = _open(url)
        self.size = _length(self.response)

    def read(self, size: int = -1) -> bytes:
        for attempt in range(self.attempts + 1):
            try:
                if self.response is None:
                    self.response = self._reopen()
                data = self.response.read(size)
                if not data and self.size is not None and self.at < self.size:
                    raise ConnectionError(f"the server ended the file at byte {self.at} of {self.size}")
                self.at += len(data)
                return data
            except (OSError, http.client.HTTPException) as exc:
                if isinstance(exc, urllib.error.HTTPError) or attempt == self.attempts:
                    raise
                say(f"the download of {self.url} broke at {self.at // 2**20} MiB ({exc}); going on from there")
                self.close()
                time.sleep(RESUME_PAUSE)
        raise AssertionError("unreachable")

    def seek(self, offset: int) -> int:
        raise io.UnsupportedOperation("a download is read from start to end")

    def _reopen(self) -> IO[bytes]:
        response = _fetch(urllib.request.Request(self.url, headers={"Range": f"bytes={self.at}-"}))
        status = getattr(response, "status", 200)
        if status == 206:
            sent = CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))  # type: ignore[attr-defined]
            if sent is None or int(sent[1]) != self.at or (self.size is not None and int(sent[2]) != self.size):
                response.close()
                raise InstallError(f"{self.url} changed while it was read (the server sent "
                                   f"{response.headers.get('Content-Range')!r} for byte {self.at} on)")  # type: ignore[attr-defined]
            return response
        # The server sends the whole file: skip what was read already.
        if _length(response) != self.size:
            response.close()
            raise InstallError(f"{self.url} changed while it was read (now {_length(response)} bytes, "
                               f"was {self.size})")
        left = self.at
        while left:
            skipped = response.read(min(left, CHUNK))
            if not skipped:
                raise ConnectionError("the server ended the file before where the download broke")
            left -= len(skipped)
        return response

    def close(self) -> None:
        if self.response is not None:
            self.response.close()
            self.response = None

    def __enter__(self) -> Download:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _length(response: IO[bytes]) -> int | None:
    length = getattr(response, "headers", {}).get("Content-Length")
    return int(length) if length and length.isdigit() else None


def read_seed(location: str) -> dict[str, bytes] | None:
    """The seed files in a directory or under a URL; None if it has none."""
    try:
        files = {}
        for name in NOCLOUD_FILES:
            with _open(f"{location.rstrip('/')}/{name}") as f:
                files[name] = f.read()
        return files
    except OSError:
        return None


def find_seed(macs: list[str], seeds: str) -> tuple[str, dict[str, bytes]] | None:
    """The seed of the first local MAC the seed store knows (seeds/<aa-bb-..>/): (mac, files)."""
    for mac in macs:
        files = read_seed(f"{seeds.rstrip('/')}/{mac.replace(':', '-')}")
        if files is not None:
            return mac, files
    return None


@dataclass(frozen=True)
class NodeInfo:
    cluster: str
    name: str
    disks: list[str]


def node_info(user_data: bytes) -> NodeInfo:
    """Who the seed is for, from the cluster facts it carries."""
    import yaml  # python3-yaml is in the image

    conf = seedlib.CONFIG_DIR
    files = {f["path"]: f.get("content", "") for f in yaml.safe_load(user_data).get("write_files", [])}
    seed = seedlib.parse(files[f"{conf}/{seedlib.CLUSTER_JSON}"], files[f"{conf}/{seedlib.IDENTITY_JSON}"])
    return NodeInfo(seed.cluster.name, seed.me.name, [d.path for d in seed.me.disks])


def _source(location: str) -> IO[bytes] | Download:
    return Download(location) if location.startswith(("http://", "https://")) else open(location, "rb")


def copy_image(source: str, target: str) -> int:
    """Stream the gzip-compressed raw image onto the target disk; returns bytes written.

    Every block of the image lands on the disk, zeros included (a used disk holds old data),
    but runs of zeros are asked of the device with BLKZEROOUT: disks that can zero or unmap
    ranges do it without transferring a byte, which makes a mostly empty image quick to write.
    """
    written = 0
    last_report = time.monotonic()
    with _source(source) as raw, gzip.open(raw) as image, open(target, "r+b", buffering=0) as disk:
        fd = disk.fileno()
        block_device = stat.S_ISBLK(os.fstat(fd).st_mode)
        while chunk := image.read(CHUNK):
            if block_device and chunk == ZEROS[:len(chunk)]:
                _zero_range(fd, written, len(chunk))
            else:
                os.pwrite(fd, chunk, written)
            written += len(chunk)
            if time.monotonic() - last_report > 10:
                say(f"written {written // 2**20} MiB")
                last_report = time.monotonic()
        os.fsync(fd)
    return written


BLKZEROOUT = 0x127F  # _IO(0x12, 127) from linux/fs.h
ZEROS = bytes(CHUNK)


def _zero_range(fd: int, offset: int, length: int) -> None:
    try:
        fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))
    except OSError:  # the device cannot: write the zeros
        os.pwrite(fd, ZEROS[:length], offset)


# ------------------------------------------------------------------ disks

@dataclass(frozen=True)
class Disk:
    path: str
    size: int
    removable: bool
    readonly: bool
    transport: str


def list_disks() -> list[Disk]:
    out = run(["lsblk", "--json", "--bytes", "--nodeps", "-o", "PATH,SIZE,RM,RO,TYPE,TRAN"]).stdout
    disks = []
    for d in json.loads(out)["blockdevices"]:
        if d["type"] == "disk":
            disks.append(Disk(d["path"], int(d["size"]), bool(d["rm"]), bool(d["ro"]), d.get("tran") or ""))
    return disks


def boot_device() -> str | None:
    """The whole disk the live system was booted from (the ISO's CD or the USB stick)."""
    proc = run(["findmnt", "-n", "-o", "SOURCE", str(MEDIUM)], check=False)
    source = proc.stdout.strip()
    if not source:
        return None
    parent = run(["lsblk", "-n", "-d", "-o", "PKNAME", source], check=False)
    name = parent.stdout.strip()
    return f"/dev/{name}" if name else source


def choose_target(disks: list[Disk], boot: str | None, reserved: list[str], image_size: int) -> Disk:
    """The rule: the first disk, by name, that is not the boot device, not removable, not
    read-only, not one the inventory reserves for Ceph, and large enough for the image."""
    reserved_real = {os.path.realpath(r) for r in reserved}
    candidates = [d for d in sorted(disks, key=lambda d: d.path)
                  if d.path != boot and not d.removable and not d.readonly
                  and os.path.realpath(d.path) not in reserved_real
                  and d.size >= max(image_size, MIN_DISK)]
    if not candidates:
        described = ", ".join(f"{d.path} ({d.size // 2**30} GiB{' removable' if d.removable else ''})"
                              for d in disks) or "none"
        raise InstallError(f"no disk to install on (disks: {described}; boot device {boot}; "
                           f"reserved for Ceph: {', '.join(reserved) or 'none'})")
    return candidates[0]


@contextmanager
def mounted(device: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="cf-target-") as mountpoint:
        run(["mount", device, mountpoint])
        try:
            yield Path(mountpoint)
        finally:
            run(["umount", mountpoint])


def partition_path(disk: str, number: int) -> str:
    # /dev/nvme0n1 -> /dev/nvme0n1p3, /dev/vda -> /dev/vda3
    return f"{disk}p{number}" if disk[-1].isdigit() else f"{disk}{number}"


def install_seed(disk: str, files: dict[str, bytes]) -> None:
    # The image's backup GPT sits where the image ended, not at the end of this (larger) disk:
    # move it there, as firmware and partitioning tools expect.
    run(["sgdisk", "--move-second-header", disk])
    run(["partprobe", disk], check=False)
    run(["udevadm", "settle"], check=False)
    with mounted(partition_path(disk, ROOT_PARTITION)) as root:
        seed = root / NOCLOUD_SEED_DIR
        seed.mkdir(parents=True, exist_ok=True)
        os.chmod(seed, 0o700)
        for name in NOCLOUD_FILES:
            (seed / name).write_bytes(files[name])
            os.chmod(seed / name, 0o600)
        if k3s.copy_from_medium(MEDIUM, root):
            say("copied the K3s air-gap bundle to /var/lib/clusterforge/k3s/")
    run(["sync"])


# ------------------------------------------------------------------ main

def install(args: dict[str, str]) -> str:
    """Install this machine. The seed comes from `clusterforge.seed` (PXE: the node's own seed
    URL) or from the boot medium's seeds/ by MAC; the image from `clusterforge.image` or the medium."""
    medium = MEDIUM / "clusterforge"
    image = args.get("image") or str(medium / "image.raw.gz")
    macs = local_macs()
    if "seed" in args:
        files = read_seed(args["seed"])
        found = (macs[0] if macs else "?", files) if files is not None else None
    else:
        found = find_seed(macs, str(medium / "seeds"))
    if found is None:
        raise InstallError(f"this machine ({', '.join(macs) or 'no NIC'}) is not in the inventory: nothing "
                           "was written. Add its MAC to the inventory, render, and rebuild the installer.")
    mac, files = found
    node = node_info(files["user-data"])
    say(f"machine {mac} is node {node.name} of cluster {node.cluster}")
    target = choose_target(list_disks(), boot_device(), node.disks, MIN_DISK)
    say(f"writing the image to {target.path} ({target.size // 2**30} GiB)")
    start = time.monotonic()
    copy_image(image, target.path)
    install_seed(target.path, files)
    say(f"installed {node.name} on {target.path} in {time.monotonic() - start:.0f}s; rebooting")
    if "report" in args:  # PXE: the server then tells this machine to boot from its disk
        try:
            _open(args["report"], attempts=3).close()
        except OSError as exc:
            say(f"could not report the install to {args['report']}: {exc}")
    return node.name


def main() -> int:
    args = kernel_args(Path("/proc/cmdline").read_text())
    if args.get("mode") != "install":
        return 0
    try:
        install(args)
    except (InstallError, CommandError, UserError, seedlib.SeedError) as exc:
        say(f"ERROR: {exc}")
        issue = Path("/etc/issue.d")
        issue.mkdir(exist_ok=True)
        (issue / "clusterforge.issue").write_text(f"\nclusterforge installer: {exc}\n\n")
        return 1
    if args.get("reboot", "yes") != "no":
        run(["systemctl", "reboot"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

