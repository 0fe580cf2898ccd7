"""The installer ISO (and USB image) for one rendered cluster.

A hybrid image made by grub-mkrescue: boots from CD and from a USB stick, BIOS and
UEFI. It carries the live system (netboot's kernel, initrd and squashfs), the image
and every node's seed by MAC; booted, the installer writes the image and the seed of
the machine it runs on (see clusterforge/installer.py). When the inventory names a K3s
air-gap bundle, its files ride along in clusterforge/k3s/, beside the image, not in it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .. import k3sbundle
from ..inventory import Cluster
from ..node.agent.k3s import MEDIUM_DIR as K3S_DIR
from ..node.layout import KERNEL_ARGS
from ..node.seed import NOCLOUD_FILES
from ..render import render_template
from ..run import run
from .context import BuildContext, cached_stage, content_hash, input_key


def _link(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def build_iso(ctx: BuildContext, cluster: Cluster, rendered: Path, netboot: Path, image_gz: Path) -> Path:
    out = ctx.out / "images" / f"{ctx.name}.iso"
    seeds = [rendered / "nodes" / n.name / f for n in cluster.nodes for f in NOCLOUD_FILES]
    grub_cfg = render_template("grub-installer.cfg.j2", cluster=cluster, kernel_args=KERNEL_ARGS)
    bundle = k3sbundle.require(cluster.services.k3s_bundle) if cluster.services.k3s_bundle else None
    key = content_hash(input_key(netboot, "netboot"), input_key(image_gz, "image_gz"), grub_cfg,
                       *(p.read_bytes() for p in seeds), "grub-mkrescue", "-volid CLUSTERFORGE",
                       f"k3s {k3sbundle.digest(bundle)}" if bundle else "no k3s")
    ctx.cache.mkdir(parents=True, exist_ok=True)

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="iso-staging-", dir=ctx.cache) as staging_dir:
            stage_iso(Path(staging_dir), cluster, rendered, netboot, image_gz, grub_cfg)
            run(["grub-mkrescue", "-o", str(tmp), staging_dir, "--", "-volid", "CLUSTERFORGE"])
            tmp.chmod(0o600)  # it carries every node's private keys

    return cached_stage("iso", out, key, build, f"installer for cluster {cluster.name}")


def stage_iso(staging: Path, cluster: Cluster, rendered: Path, netboot: Path, image_gz: Path, grub_cfg: str) -> None:
    """The ISO's tree: the live system, the compressed image, every node's seed by MAC, and the
    K3s bundle's files in clusterforge/k3s/ when the inventory has one (node/agent/k3s.py's
    copy_from_medium() puts them into the installed system)."""
    for name, target in (("vmlinuz", "vmlinuz"), ("initrd.img", "initrd.img"),
                         ("root.squashfs", "filesystem.squashfs")):
        _link(netboot / name, staging / "live" / target)
    _link(image_gz, staging / "clusterforge" / "image.raw.gz")
    for node in cluster.nodes:
        for name in NOCLOUD_FILES:
            _link(rendered / "nodes" / node.name / name,
                  staging / "clusterforge" / "seeds" / node.mac_hyphen / name)
    if cluster.services.k3s_bundle is not None:
        k3sbundle.place(k3sbundle.require(cluster.services.k3s_bundle), staging / K3S_DIR)
    (staging / "boot" / "grub").mkdir(parents=True)
    (staging / "boot" / "grub" / "grub.cfg").write_text(grub_cfg)


def build_usb(ctx: BuildContext, iso: Path) -> Path:
    """The USB image: the hybrid ISO is a valid disk image; write it to a stick with dd."""
    out = ctx.out / "images" / f"{ctx.name}-usb.img"

    def build(tmp: Path) -> None:
        shutil.copyfile(iso, tmp)
        tmp.chmod(0o600)

    return cached_stage("usb", out, content_hash(input_key(iso, "iso")), build, out.name)
