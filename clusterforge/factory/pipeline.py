"""The image factory, stage by stage. Each stage returns at once when its inputs are unchanged.

    rootfs (mmdebstrap) -> base disk (GPT, GRUB BIOS+UEFI) -> Packer (overlays, agent,
    identity reset) -> qcow2 -> raw -> netboot (kernel, initrd, squashfs) + raw.gz
    -> installer ISO -> USB image -> release
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..inventory import Cluster
from .context import BuildContext
from .convert import build_raw
from .disk import build_base_disk
from .iso import build_iso, build_usb
from .netboot import build_image_gz, build_netboot
from .packer import build_qcow2
from .rootfs import build_rootfs


@dataclass(frozen=True)
class Artifacts:
    qcow2: Path
    raw: Path
    netboot: Path | None = None
    image_gz: Path | None = None
    iso: Path | None = None
    usb: Path | None = None


def build_image(ctx: BuildContext) -> Artifacts:
    build_rootfs(ctx)
    build_base_disk(ctx)
    qcow2 = build_qcow2(ctx)
    return Artifacts(qcow2=qcow2, raw=build_raw(ctx))


def build_netboot_files(ctx: BuildContext) -> Artifacts:
    image = build_image(ctx)
    return Artifacts(qcow2=image.qcow2, raw=image.raw, netboot=build_netboot(ctx, image.raw),
                     image_gz=build_image_gz(ctx, image.raw))


def build_installers(ctx: BuildContext, cluster: Cluster, rendered: Path) -> Artifacts:
    a = build_netboot_files(ctx)
    assert a.netboot is not None and a.image_gz is not None
    iso = build_iso(ctx, cluster, rendered, a.netboot, a.image_gz)
    return Artifacts(qcow2=a.qcow2, raw=a.raw, netboot=a.netboot, image_gz=a.image_gz, iso=iso,
                     usb=build_usb(ctx, iso))
