"""Read a disk image's root filesystem through a read-only loop device (root only)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..run import run

ROOT_PARTITION = 3  # BIOS boot, ESP, root: see disk.py


@contextmanager
def mounted_root(raw: Path, partition: int = ROOT_PARTITION) -> Iterator[Path]:
    device = run(["losetup", "--find", "--show", "--read-only", "--partscan", str(raw)]).stdout.strip()
    try:
        with tempfile.TemporaryDirectory(prefix="cf-root-") as mountpoint:
            # noload: a read-only look must not replay the journal of an image that was shut down hard
            run(["mount", "-o", "ro,noload", f"{device}p{partition}", mountpoint])
            try:
                yield Path(mountpoint)
            finally:
                run(["umount", mountpoint])
    finally:
        run(["losetup", "--detach", device])
