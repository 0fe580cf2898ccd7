"""PXE for real: dnsmasq + HTTP in a network namespace, machines booting through iPXE."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from clusterforge import inventory, render
from clusterforge.build import pipeline
from clusterforge.build.context import BuildContext
from clusterforge.pxe.discovery import Discoveries
from clusterforge.run import run
from clusterforge.ssh import Target
from clusterforge.vm.machine import Drive, Machine, MachineSpec, Nic
from clusterforge.vm.network import ClusterNet

from .conftest import REPO, RUNS

INVENTORY = REPO / "qemu" / "pxe.yaml"
STRANGER = "52:54:00:00:01:99"


@dataclass
class Site:
    cluster: inventory.Cluster
    net: ClusterNet
    state: Path
    log: Path

    def ssh(self, node: inventory.Node) -> Target:
        return Target(str(node.ip), self.state / self.cluster.name / "ssh" / "id_ed25519", netns=self.net.netns)


@pytest.fixture(scope="module")
def site(build_ctx: BuildContext, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    pipeline.build_netboot_files(build_ctx)
    cluster = inventory.load(INVENTORY)
    state = tmp_path_factory.mktemp("pxe") / "state"
    render.render(cluster, build_ctx.out, state)  # creates the secrets the nodes' seeds carry
    net = ClusterNet(cluster.name, cluster.network.subnet, cluster.network.gateway)
    net.create([n.name for n in cluster.nodes] + ["stranger"])
    net.add_address(cluster.network.boot_server)
    rundir = RUNS / "pxe-server"
    rundir.mkdir(parents=True, exist_ok=True)
    log = rundir / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            ["ip", "netns", "exec", net.netns, sys.executable, "-m", "clusterforge.pxe",
             "--inventory", str(INVENTORY), "--interface", net.bridge, "--dist", str(build_ctx.out),
             "--state", str(state), "--runs", str(rundir)], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while "serving cluster pxelab" not in log.read_text():
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield Site(cluster, net, state, log)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        leftover = subprocess.run(["pgrep", "-f", f"dnsmasq.*{rundir}"], capture_output=True, text=True).stdout
        net.destroy()
        assert leftover == "", f"dnsmasq left running: {leftover}"


def pxe_machine(site: Site, name: str, mac: str, rundir: Path, firmware: str, disk: bool) -> MachineSpec:
    drives: tuple[Drive, ...] = ()
    if disk:
        path = rundir / f"{name}.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "8G"])
        drives = (Drive(path, bootindex=2),)
    return MachineSpec(name=name, memory_mb=2048, cpus=2, firmware=firmware, drives=drives,
                       nics=(Nic(mac, site.net.netdev(name), bootindex=1),), netns=site.net.netns)


def install_then_boot_from_disk(site: Site, node: inventory.Node, rundir: Path, firmware: str) -> None:
    with Machine(pxe_machine(site, node.name, node.mac, rundir, firmware, disk=True), rundir) as m:
        m.wait_console(rf"machine {node.mac} is node {node.name}", 900, phase="installer")
        m.wait_console(rf"installed {node.name} on /dev/vda", 900, phase="installed")
        m.wait_console(rf"^{node.name} login: ", 600, phase="login")
        target = site.ssh(node)
        target.wait(120)
        assert target.run("hostname").stdout.strip() == node.name
        assert target.run("findmnt -n -o SOURCE /").stdout.strip() == "/dev/vda3"
        m.shutdown()
    assert f"{node.name} installed; it boots from its disk" in site.log.read_text()


def test_pxe_bios_install_then_boot_from_disk(site: Site, rundir: Path) -> None:
    """SeaBIOS: after the install, iPXE exits and the firmware boots the next device."""
    install_then_boot_from_disk(site, site.cluster.node("s1"), rundir, "bios")


def test_pxe_uefi_install_then_boot_from_disk(site: Site, rundir: Path) -> None:
    """OVMF: after the install, iPXE loads the installed disk's GRUB (localboot.efi)."""
    install_then_boot_from_disk(site, site.cluster.node("c1"), rundir, "uefi")
    assert "sent /images/netboot/localboot.efi" in site.log.read_text()


def test_pxe_diskless(site: Site, rundir: Path) -> None:
    node = site.cluster.node("c2")
    with Machine(pxe_machine(site, node.name, node.mac, rundir, "bios", disk=False), rundir) as m:
        m.wait_console(rf"^{node.name} login: ", 900, phase="login")
        target = site.ssh(node)
        target.wait(120)
        assert target.run("hostname").stdout.strip() == node.name
        assert "overlay" in target.run("findmnt -n -o FSTYPE /").stdout
        m.shutdown()


def test_unknown_machine_is_discovered(site: Site, rundir: Path) -> None:
    with Machine(pxe_machine(site, "stranger", STRANGER, rundir, "bios", disk=False), rundir):
        deadline = time.monotonic() + 300
        while f"unknown machine {STRANGER} reported itself" not in site.log.read_text():
            assert time.monotonic() < deadline, site.log.read_text()
            time.sleep(1)  # the server's log is the only witness: poll it
    listed = Discoveries(site.state, site.cluster).as_inventory()
    assert f'- mac: "{STRANGER}"' in listed
