"""Read a disk image's root filesystem through a read-only loop mount (root only).

The partition is mounted by its byte offset: loop partition nodes (losetup --partscan)
do not appear in every environment, containers among them.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..node.layout import ROOT_PARTITION
from ..run import run


def partition_extent(raw: Path, number: int) -> tuple[int, int]:
    """(offset, size) in bytes of partition `number` of a disk image."""
    table = json.loads(run(["sfdisk", "--json", str(raw)]).stdout)["partitiontable"]
    sector = int(table.get("sectorsize", 512))
    part = table["partitions"][number - 1]
    return int(part["start"]) * sector, int(part["size"]) * sector


@contextmanager
def mounted_root(raw: Path, partition: int = ROOT_PARTITION) -> Iterator[Path]:
    offset, size = partition_extent(raw, partition)
    with tempfile.TemporaryDirectory(prefix="cf-root-") as mountpoint:
        # noload: a read-only look must not replay the journal of an image that was shut down hard
        run(["mount", "-t", "ext4", "-o", f"ro,noload,loop,offset={offset},sizelimit={size}", str(raw), mountpoint])
        try:
            yield Path(mountpoint)
        finally:
            run(["umount", mountpoint])
