"""Netboot files from the final image: kernel, initrd (with live-boot) and a squashfs root.

The same three files boot a diskless node (`boot=live fetch=<squashfs URL>`), the PXE
installer, and (copied onto it) the ISO/USB installer. Also the gzip-compressed raw
image the installers write to disk.

And localboot.efi, which the PXE server hands to UEFI machines that are already
installed: a small GRUB that finds the EFI system partition of an installed disk (by
its volume serial, the same in every build of this image) and starts the loader there,
so the node boots with its own GRUB and kernel. When there is none, it returns to iPXE,
which exits to the firmware. Exiting to the firmware straight away is not enough:
firmware such as OVMF then shows its setup menu instead of trying the next boot device.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

from ..run import run
from . import disk
from .context import BuildContext, cached_stage, content_hash, input_key
from .loop import mounted_root

GZIP_CHUNK = 8 * 1024**2
# Each line runs even when the one before failed: no ESP found, no loader, or a loader
# that returns, all end in `exit`, back to iPXE. chainloader takes its device from
# $root, whatever the path says, so the search sets root.
LOCALBOOT_CONFIG = """search --no-floppy --fs-uuid --set=root {esp_uuid}
chainloader /EFI/BOOT/BOOTX64.EFI
boot
exit
"""
LOCALBOOT_MODULES = ["part_gpt", "fat", "search", "search_fs_uuid", "chain", "boot", "minicmd", "echo"]
# zstd level 6, not mksquashfs's 15: 8 times faster to build, 7% larger, and as fast to
# unpack. /etc/fstab names the disk's partitions, which a diskless node has not got;
# live-boot writes its own.
SQUASHFS_ARGS = ("-comp", "zstd", "-Xcompression-level", "6", "-noappend", "-no-progress", "-quiet",
                 "-e", "etc/fstab", "boot/efi")


def build_netboot(ctx: BuildContext, raw: Path) -> Path:
    """dist/images/netboot/{vmlinuz,initrd.img,root.squashfs,localboot.efi}, cached on the raw image's key."""
    out = ctx.out / "images" / "netboot"
    key = content_hash(input_key(raw, "raw"), LOCALBOOT_CONFIG, str(LOCALBOOT_MODULES), str(SQUASHFS_ARGS))

    def build(tmp: Path) -> None:
        tmp.mkdir()
        with mounted_root(raw) as root:
            shutil.copyfile((root / "vmlinuz").resolve(), tmp / "vmlinuz")
            shutil.copyfile((root / "initrd.img").resolve(), tmp / "initrd.img")
            disk.mkimage(root, "x86_64-efi", LOCALBOOT_CONFIG.format(esp_uuid=ctx.esp_uuid), tmp / "localboot.efi",
                         LOCALBOOT_MODULES)
            run(["mksquashfs", str(root), str(tmp / "root.squashfs"), *SQUASHFS_ARGS])

    return cached_stage("netboot", out, key, build, "kernel, initrd, squashfs root, localboot.efi")


def build_image_gz(ctx: BuildContext, raw: Path) -> Path:
    """dist/images/<name>.raw.gz: what the installers stream onto a disk."""
    out = ctx.out / "images" / f"{ctx.name}.raw.gz"

    def build(tmp: Path) -> None:
        with open(raw, "rb") as src, gzip.GzipFile(tmp, "wb", compresslevel=1, mtime=0) as dst:
            while chunk := src.read(GZIP_CHUNK):
                dst.write(chunk)

    return cached_stage("raw.gz", out, content_hash(input_key(raw, "raw"), "gzip-1"), build, out.name)
