"""What every build stage shares: where inputs and outputs live, and the helpers
that cache outputs by the hash of their inputs.

A stage computes a key with `content_hash()` over everything that shapes its
output and calls `cached_stage()`, which returns at once when the output is fresh,
otherwise builds into a temporary path renamed into place, then stamps it. The stamp
is written last, so an interrupted build is never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..fsutil import atomic_path
from ..inventory import IMAGE_NAME
from ..log import info, stage
from ..node.layout import KERNEL_ARGS
from ..packages import image_package_sets

MiB = 1024**2
GiB = 1024**3

REPO_ROOT = Path(__file__).resolve().parents[2]

# Fixed namespace so filesystem and partition ids derive from the image name alone:
# rootfs (fstab, grub.cfg) and disk (mkfs, sgdisk) agree without passing data around.
_ID_NAMESPACE = uuid.UUID("6f1d2c1e-4a59-4c3e-9a51-2f0c6b7d9e10")


# Never part of a content hash: caches and editor/build droppings.
_HASH_IGNORE = {"__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}


@dataclass(frozen=True)
class BuildContext:
    root: Path = REPO_ROOT
    out: Path = REPO_ROOT / "dist"
    name: str = IMAGE_NAME
    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    security_mirror: str = "http://deb.debian.org/debian-security"
    # Shared with the host's apt so repeated builds (and host installs) download once.
    apt_cache: Path = Path("/var/cache/apt/archives")
    package_sets: tuple[str, ...] = image_package_sets("debian-12")
    kernel_cmdline: str = KERNEL_ARGS
    disk_size: int = 4 * GiB
    esp_size: int = 100 * MiB

    @classmethod
    def create(cls, root: Path | None = None, out: Path | None = None) -> BuildContext:
        root = (root or REPO_ROOT).resolve()
        return cls(root=root, out=(out or root / "dist").resolve())

    @property
    def cache(self) -> Path:
        return self.out / "cache"

    @property
    def packages_dir(self) -> Path:
        return self.root / "images" / "packages"

    @property
    def rootfs_dir(self) -> Path:
        return self.cache / "rootfs"

    @property
    def base_disk(self) -> Path:
        """The stage-2 output, input of later stages; never booted directly."""
        return self.cache / "base.raw"

    def stable_uuid(self, what: str) -> str:
        return str(uuid.uuid5(_ID_NAMESPACE, f"{self.name}/{what}"))

    @property
    def root_uuid(self) -> str:
        return self.stable_uuid("rootfs")

    @property
    def esp_volume_id(self) -> str:
        """FAT volume serial as mkfs.vfat -i wants it (8 hex digits)."""
        return self.stable_uuid("esp").replace("-", "")[:8].upper()

    @property
    def esp_uuid(self) -> str:
        """The same serial as udev and fstab spell it (XXXX-XXXX)."""
        vid = self.esp_volume_id
        return f"{vid[:4]}-{vid[4:]}"


# --- content hashes ------------------------------------------------------------------


def content_hash(*parts: Path | str | bytes) -> str:
    """sha256 over files, directory trees and strings, independent of where the
    tree lives and of directory listing order. A missing path hashes as missing,
    so an optional input (an overlay) appearing later changes the hash."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            _hash_path(h, part)
        elif isinstance(part, bytes):
            _feed(h, b"bytes", part)
        else:
            _feed(h, b"str", part.encode())
    return h.hexdigest()


def _feed(h: hashlib._Hash, *fields: bytes) -> None:
    # Length-prefixed so ("ab", "c") and ("a", "bc") differ.
    for f in fields:
        h.update(len(f).to_bytes(8, "little"))
        h.update(f)


def _hash_path(h: hashlib._Hash, top: Path) -> None:
    if not top.exists() and not top.is_symlink():
        _feed(h, b"missing", top.name.encode())
        return
    if not top.is_dir() or top.is_symlink():
        _hash_entry(h, top, top.name)
        return
    _feed(h, b"tree", top.name.encode())
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if d not in _HASH_IGNORE)
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            if name.endswith(".pyc") or name in _HASH_IGNORE:
                continue
            _hash_entry(h, base / name, (base / name).relative_to(top).as_posix())


def _hash_entry(h: hashlib._Hash, path: Path, rel: str) -> None:
    if path.is_symlink():
        _feed(h, b"link", rel.encode(), os.readlink(path).encode())
    elif path.is_dir():
        _feed(h, b"dir", rel.encode())
    else:
        executable = b"x" if os.access(path, os.X_OK) else b"-"
        _feed(h, b"file", rel.encode(), executable, path.read_bytes())


# --- cache stamps --------------------------------------------------------------------


def stamp_path(output: Path) -> Path:
    return output.with_name(output.name + ".hash")


def is_fresh(output: Path, key: str) -> bool:
    stamp = stamp_path(output)
    return output.exists() and stamp.exists() and stamp.read_text().strip() == key


def read_stamp(output: Path) -> str | None:
    stamp = stamp_path(output)
    return stamp.read_text().strip() if output.exists() and stamp.exists() else None


def input_key(upstream: Path, stage: str) -> str:
    """The cache key of a finished upstream output; a stage cannot run without one."""
    key = read_stamp(upstream)
    if key is None:
        raise RuntimeError(f"no finished output at {upstream}: run the {stage} stage first")
    return key


def cached_stage(name: str, out: Path, key: str, build: Callable[[Path], None], title: str = "") -> Path:
    """The one shape of every stage: up to date (say so, return), or build into a temporary
    path that replaces `out` only when complete, then stamp it with the key."""
    if is_fresh(out, key):
        info(f"{name}: up to date ({out})")
        return out
    drop_stamp(out)
    with stage(f"{name}: {title}" if title else name), atomic_path(out) as tmp:
        build(tmp)
    write_stamp(out, key)
    return out


def drop_stamp(output: Path) -> None:
    stamp_path(output).unlink(missing_ok=True)


def write_stamp(output: Path, key: str) -> None:
    stamp = stamp_path(output)
    tmp = stamp.with_name(f"{stamp.name}.tmp-{os.getpid()}")
    tmp.write_text(key + "\n")
    os.replace(tmp, stamp)
