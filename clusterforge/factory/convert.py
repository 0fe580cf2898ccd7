"""Stage 4: the node image as a raw disk, for dd to a disk or USB stick and for
PXE/USB installers that write it block for block."""

from __future__ import annotations

import os
from pathlib import Path

from ..log import human_bytes, info
from ..run import run
from .context import BuildContext, cached_stage, content_hash, drop_stamp, input_key, stamp_path
from .packer import images_dir, qcow2_image


def raw_image(ctx: BuildContext) -> Path:
    return images_dir(ctx) / f"{ctx.name}.raw"


def build_raw(ctx: BuildContext) -> Path:
    """dist/images/<name>.raw (sparse), converted from the qcow2 when it changed."""
    source = qcow2_image(ctx)
    source_key = input_key(source, "packer")
    key = content_hash(source_key, "qemu-img convert -O raw")
    out = raw_image(ctx)
    # Someone who booted the raw image changed it: newer than its stamp means redo.
    if out.exists() and stamp_path(out).exists() and out.stat().st_mtime > stamp_path(out).stat().st_mtime:
        drop_stamp(out)
    # qemu-img writes zeros as holes (-S 4k by default): the file stays sparse.
    def build(tmp: Path) -> None:
        run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", source, tmp])

    cached_stage("raw", out, key, build, out.name)
    used = os.stat(out).st_blocks * 512
    info(f"raw: {out} ({human_bytes(out.stat().st_size)}, {human_bytes(used)} allocated)")
    return out
