"""The installers for real: the USB image on an empty disk, the ISO on an unknown machine,
a diskless netboot."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterforge import inventory
from clusterforge.factory import pipeline
from clusterforge.factory.context import BuildContext
from clusterforge.node.layout import KERNEL_ARGS
from clusterforge.run import run
from clusterforge.ssh import Target
from clusterforge.vm.machine import Drive, Machine, MachineSpec, Nic
from clusterforge.vm.network import free_port, user_net

Lab = tuple[inventory.Cluster, Path, Path]


@pytest.fixture(scope="module")
def installers(build_ctx: BuildContext, lab: Lab) -> pipeline.Artifacts:
    cluster, rendered, _ = lab
    return pipeline.build_installers(build_ctx, cluster, rendered)


def empty_disk(path: Path) -> Drive:
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "8G"])
    return Drive(path, bootindex=1)


def node_net(lab: Lab, node: inventory.Node) -> tuple[str, Target]:
    cluster, _, state = lab
    port = free_port()
    net = user_net(cluster.network.subnet, cluster.network.gateway, {port: (node.ip, 22)}, dhcp_start=node.ip)
    return net, Target("127.0.0.1", state / cluster.name / "ssh" / "id_ed25519", port=port)


@pytest.mark.all_only
def test_usb_installs_under_uefi_and_boots_from_disk(installers: pipeline.Artifacts, lab: Lab,
                                                     rundir: Path) -> None:
    """The USB image (the hybrid ISO as written to a stick) under UEFI (OVMF). The stick is
    writable, not flagged removable and /dev/sda, first by name: the installer must pass
    over its own boot device and write /dev/vda. (The ISO as a CD under BIOS is booted by
    the unknown-machine test below.)"""
    assert installers.usb is not None
    stick = rundir / "stick.qcow2"  # a writable overlay: the artifact itself stays untouched
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(installers.usb), "-F", "raw", str(stick)])
    node = lab[0].node("s1")
    net, target = node_net(lab, node)
    spec = MachineSpec(name="s1", memory_mb=2048, cpus=2, firmware="uefi",
                       drives=(empty_disk(rundir / "disk.qcow2"), Drive(stick, media="usb", bootindex=2)),
                       nics=(Nic(node.mac, net),))
    with Machine(spec, rundir) as m:
        m.wait_console(r"clusterforge-installer: machine 52:54:00:00:00:11 is node s1", 600, phase="installer")
        m.wait_console(r"installed s1 on /dev/vda", 900, phase="installed")
        m.wait_console(r"^s1 login: ", 600, phase="login")
        target.wait(120)
        assert target.run("hostname").stdout.strip() == "s1"
        assert target.run("findmnt -n -o SOURCE /").stdout.strip() == "/dev/vda3"
        assert target.run("lsblk -n -d -o NAME,TRAN /dev/sda").stdout.split() == ["sda", "usb"]
        m.shutdown()


# With ./forge test --all (by default, PXE discovery meets an unknown machine).
@pytest.mark.all_only
@pytest.mark.parametrize(("media", "firmware"), [("cdrom", "bios"), ("cdrom", "uefi"), ("usb", "bios")],
                         ids=["cd-bios", "cd-uefi", "usb-bios"])
def test_unknown_machine_writes_nothing(installers: pipeline.Artifacts, lab: Lab, rundir: Path,
                                        media: str, firmware: str) -> None:
    """An unknown MAC gets a message on the console and the disk stays empty. Also boots the
    hybrid image the three ways the install test above does not: a CD under BIOS and UEFI,
    a USB stick under BIOS. A BIOS boots only the first of its hard disks, so there the stick
    comes first, as when it is picked from the firmware's boot menu."""
    assert installers.iso is not None and installers.usb is not None
    disk = empty_disk(rundir / "disk.qcow2")
    net, _ = node_net(lab, lab[0].node("s1"))
    medium = installers.iso if media == "cdrom" else installers.usb  # read-only: nothing is written
    bootindex = 0 if (media, firmware) == ("usb", "bios") else 2
    spec = MachineSpec(name="stranger", memory_mb=2048, cpus=2, firmware=firmware,
                       drives=(disk, Drive(medium, format="raw", media=media, bootindex=bootindex, readonly=True)),
                       nics=(Nic("52:54:00:99:99:99", net),))
    with Machine(spec, rundir) as m:
        m.wait_console(r"52:54:00:99:99:99\) is not in the inventory: nothing was written", 600)
    allocated = run(["qemu-img", "map", "--output=json", str(disk.path)]).stdout
    assert '"data": true' not in allocated


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A throwaway HTTP server on the host's loopback: the guest reaches it as the gateway."""
    root = tmp_path / "www"
    root.mkdir()
    port = free_port()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, port
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.all_only
def test_netboot_diskless(installers: pipeline.Artifacts, lab: Lab, rundir: Path,
                          http_root: tuple[Path, int]) -> None:
    assert installers.netboot is not None
    cluster, rendered, _ = lab
    node = cluster.node("s2")
    www, port = http_root
    (www / "root.squashfs").symlink_to(installers.netboot / "root.squashfs")
    (www / "seed").symlink_to(rendered / "nodes" / node.name)
    base = f"http://{cluster.network.gateway}:{port}"
    net, target = node_net(lab, node)
    spec = MachineSpec(name="s2", memory_mb=2048, cpus=2, nics=(Nic(node.mac, net),),
                       kernel=installers.netboot / "vmlinuz", initrd=installers.netboot / "initrd.img",
                       append=f"boot=live fetch={base}/root.squashfs ip=dhcp {KERNEL_ARGS} "
                              f"ds=nocloud-net;s={base}/seed/")
    with Machine(spec, rundir) as m:
        m.wait_console(r"^s2 login: ", 900, phase="login")
        target.wait(120)
        assert target.run("hostname").stdout.strip() == "s2"
        assert "overlay" in target.run("findmnt -n -o FSTYPE /").stdout
        m.shutdown()
