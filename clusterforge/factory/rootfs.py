"""Stage 1: the node's root filesystem, a directory made by mmdebstrap.

A directory (not a tarball) because stage 2 feeds it straight to
`mkfs.ext4 -d`, and customizing it needs no unpacking. Only the system goes in
here (packages, units, boot and cloud-init config), so the stage is keyed on the
package lists, the unit list and this module's settings alone (never its code: RECIPE
says when what it writes changed): the node package and overlays/ are laid in by the
Packer stage, and editing them never reruns mmdebstrap. The host's apt cache is
hard-linked in before mmdebstrap runs and newly fetched .debs are linked back
afterwards, so a second build downloads only the package indexes.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path

from ..log import human_bytes, info
from ..packages import packages_of, unit_patterns
from ..run import run
from .context import BuildContext, cached_stage, content_hash

RECIPE = 2  # bump when customize() changes what it writes into the tree
ENABLE = [
    "systemd-networkd.service",
    "systemd-resolved.service",
    "ssh.service",
    "clusterforge-ssh-keygen.service",
]

# cloud-init's ssh module regenerates host keys when it runs; this covers boots
# without a datasource, where cloud-init disables itself and sshd would have no keys.
SSH_KEYGEN_UNIT = """\
[Unit]
Description=Generate SSH host keys missing after first boot setup
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key
After=cloud-init.service
Before=ssh.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
"""

# Without it a node whose seed has no network-config (or no seed) has no network.
# cloud-init's 10-cloud-init-*.network files sort first and win.
FALLBACK_NETWORK = """\
[Match]
Type=ether
Name=en* eth*

[Network]
DHCP=yes

[Link]
RequiredForOnline=no
"""

# Only datasources found locally (NoCloud: seed ISO, ds=nocloud on the kernel
# command line; ConfigDrive: a config-2 label), so nothing probes cloud metadata
# services. Two of them because ds-identify skips detection and enables cloud-init
# (with DataSourceNone: ~30 s of TCG boot, new SSH keys) for a list of one + None;
# with two it disables cloud-init when neither is present.
# C.UTF-8 is built into libc; the default en_US.UTF-8 is not generated here.
CLOUD_CFG = """\
datasource_list: [NoCloud, ConfigDrive, None]
locale: C.UTF-8
system_info:
  network:
    renderers: [networkd]
    activators: [networkd]
"""

HOSTS = """\
127.0.0.1\tlocalhost
127.0.1.1\tclusterforge
::1\tlocalhost ip6-localhost ip6-loopback
ff02::1\tip6-allnodes
ff02::2\tip6-allrouters
"""

# Docs, man pages and translations are a sizeable share of the image and unused on
# nodes; copyright files stay for license compliance.
DPKG_EXCLUDES = [
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
]


def packages(ctx: BuildContext) -> list[str]:
    return packages_of(ctx.package_sets)


def sources(ctx: BuildContext) -> list[str]:
    return [
        f"deb {ctx.mirror} {ctx.suite} main",
        f"deb {ctx.mirror} {ctx.suite}-updates main",
        f"deb {ctx.security_mirror} {ctx.suite}-security main",
    ]


def rootfs_key(ctx: BuildContext) -> str:
    # The lists' items, not their files: editing a comment rebuilds nothing.
    return content_hash(
        "\n".join(packages(ctx)),
        "\n".join(unit_patterns()),
        "\n".join(ENABLE + DPKG_EXCLUDES),
        SSH_KEYGEN_UNIT, FALLBACK_NETWORK, CLOUD_CFG, HOSTS, str(RECIPE),
        ctx.suite,
        *sources(ctx),
        ctx.kernel_cmdline,
        ctx.root_uuid,
        ctx.esp_uuid,
    )


def build_rootfs(ctx: BuildContext) -> Path:
    def build(tmp: Path) -> None:
        seeded = seed_apt_cache(ctx.apt_cache, tmp)
        try:
            mmdebstrap(ctx, tmp)
        finally:
            harvest_apt_cache(tmp, ctx.apt_cache, seeded)
        customize(ctx, tmp)
        info(f"rootfs: {human_bytes(tree_size(tmp))}")

    return cached_stage("rootfs", ctx.rootfs_dir, rootfs_key(ctx), build, f"mmdebstrap {ctx.suite}")


def mmdebstrap(ctx: BuildContext, target: Path) -> None:
    run(
        [
            "mmdebstrap",
            "--mode=root",
            "--format=directory",
            "--variant=minbase",
            '--aptopt=APT::Install-Recommends "false"',
            *(f"--dpkgopt={opt}" for opt in DPKG_EXCLUDES),
            "--include=" + ",".join(packages(ctx)),
            # The target holds the seeded apt cache, and the cache must survive
            # until harvest_apt_cache() has linked new downloads back to the host.
            "--skip=check/empty",
            "--skip=essential/unlink",
            "--skip=cleanup/apt/cache",
            ctx.suite,
            target,
            *sources(ctx),
        ],
        capture=False,
    )


def _archives(root: Path) -> Path:
    return root / "var/cache/apt/archives"


def seed_apt_cache(host_cache: Path, target: Path) -> set[str]:
    """Hard-link the host's .debs into the target (same filesystem: instant, no
    space); fall back to nothing when the cache is elsewhere or missing."""
    dest = _archives(target)
    (dest / "partial").mkdir(parents=True, exist_ok=True)
    seeded: set[str] = set()
    if not host_cache.is_dir():
        return seeded
    for deb in host_cache.glob("*.deb"):
        try:
            os.link(deb, dest / deb.name)
        except OSError:
            break  # another filesystem (EXDEV): every link would fail
        seeded.add(deb.name)
    info(f"rootfs: {len(seeded)} cached packages linked in from {host_cache}")
    return seeded


def harvest_apt_cache(target: Path, host_cache: Path, seeded: set[str]) -> None:
    """Give new downloads back to the host cache, then empty the image's cache."""
    src = _archives(target)
    if not src.is_dir():
        return
    new = [deb for deb in src.glob("*.deb") if deb.name not in seeded]
    if host_cache.is_dir() and os.access(host_cache, os.W_OK):
        for deb in new:
            dest = host_cache / deb.name
            if not dest.exists():
                try:
                    os.link(deb, dest)
                except OSError:
                    shutil.copy2(deb, dest)
        info(f"rootfs: {len(new)} newly downloaded packages added to {host_cache}")
    for entry in src.iterdir():
        if entry.is_file() and entry.name != "lock":
            entry.unlink()
    shutil.rmtree(src / "partial", ignore_errors=True)
    (src / "partial").mkdir()


def customize(ctx: BuildContext, root: Path) -> None:
    etc = root / "etc"
    (etc / "systemd/system/clusterforge-ssh-keygen.service").write_text(SSH_KEYGEN_UNIT)
    (etc / "systemd/network/99-clusterforge-dhcp.network").write_text(FALLBACK_NETWORK)
    (etc / "cloud/cloud.cfg.d/90_clusterforge.cfg").write_text(CLOUD_CFG)
    set_units(ctx, root)

    # First boot must make this machine unique: empty machine-id (systemd fills it
    # in, and an empty file is "not first boot", so presets are not re-applied).
    (etc / "machine-id").write_text("")
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for key in (etc / "ssh").glob("ssh_host_*"):
        key.unlink()
    (etc / "hostname").write_text("clusterforge\n")
    (etc / "hosts").write_text(HOSTS)
    # mmdebstrap copied the build host's resolv.conf; nodes use resolved's stub.
    (etc / "resolv.conf").unlink(missing_ok=True)
    (etc / "resolv.conf").symlink_to("../run/systemd/resolve/stub-resolv.conf")

    write_boot_config(ctx, root)


def set_units(ctx: BuildContext, root: Path) -> None:
    patterns = unit_patterns()
    enabled = enabled_units(root)
    to_disable = [u for u in enabled if any(fnmatch.fnmatch(u, p) for p in patterns)]
    if to_disable:
        info(f"rootfs: disabling {' '.join(to_disable)}")
        run(["systemctl", f"--root={root}", "disable", *to_disable])
    run(["systemctl", f"--root={root}", "enable", *ENABLE])
    left = [u for u in enabled_units(root) if any(fnmatch.fnmatch(u, p) for p in patterns)]
    if left:
        raise RuntimeError(f"units still enabled after disabling them: {left}")


def enabled_units(root: Path) -> list[str]:
    proc = run(["systemctl", f"--root={root}", "list-unit-files", "--state=enabled", "--no-legend"])
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def write_boot_config(ctx: BuildContext, root: Path) -> None:
    """fstab and GRUB's menu, by the filesystem ids stage 2 gives the partitions.

    The menu boots /vmlinuz and /initrd.img, symlinks the kernel package keeps
    current, so a kernel upgrade on a node needs no grub.cfg regeneration.
    """
    (root / "boot/efi").mkdir(parents=True, exist_ok=True)
    (root / "etc/fstab").write_text(
        f"UUID={ctx.root_uuid}\t/\text4\trw,errors=remount-ro\t0 1\n"
        f"UUID={ctx.esp_uuid}\t/boot/efi\tvfat\tumask=0077,nofail\t0 2\n"
    )
    grub = root / "boot/grub"
    grub.mkdir(parents=True, exist_ok=True)
    # Modules next to grub.cfg, as grub-install would lay them out: the boot
    # images embed only what finding this directory takes.
    for platform in ("i386-pc", "x86_64-efi"):
        shutil.copytree(root / "usr/lib/grub" / platform, grub / platform, dirs_exist_ok=True)
    (grub / "grub.cfg").write_text(
        f"""\
# Written by clusterforge at image build time.
set timeout=1
serial --unit=0 --speed=115200
terminal_input console serial
terminal_output console serial
if [ "$grub_platform" = efi ]; then insmod efi_gop; fi
menuentry 'clusterforge (Debian 12)' {{
    linux /vmlinuz root=UUID={ctx.root_uuid} ro {ctx.kernel_cmdline}
    initrd /initrd.img
}}
"""
    )
    # For whoever runs update-grub on a node later: same console settings.
    (root / "etc/default/grub").write_text(
        f'GRUB_TIMEOUT=1\nGRUB_CMDLINE_LINUX="{ctx.kernel_cmdline}"\n'
        'GRUB_TERMINAL="console serial"\n'
        'GRUB_SERIAL_COMMAND="serial --unit=0 --speed=115200"\n'
    )


def tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_blocks * 512
    return total
