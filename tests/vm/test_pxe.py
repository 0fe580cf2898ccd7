"""PXE for real: dnsmasq + HTTP in a network namespace, machines booting through iPXE."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from clusterforge import inventory
from clusterforge.factory import pipeline
from clusterforge.factory.context import BuildContext
from clusterforge.pxe.discovery import Discoveries
from clusterforge.run import run
from clusterforge.ssh import Target
from clusterforge.vm.machine import Drive, Machine, MachineSpec, Nic
from clusterforge.vm.network import ClusterNet

from .conftest import REPO, RUNS, forge

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


def wait_log(log: Path, text: str, seconds: float) -> None:
    """Poll a server's log (its only witness of what a machine asked for) for text."""
    deadline = time.monotonic() + seconds
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"no '{text}' in {log}:\n{log.read_text()}"
        time.sleep(1)


def start_server(net: ClusterNet, rundir: Path, mode: str, *paths: str) -> subprocess.Popen[bytes]:
    """`./forge pxe.serve` as the README shows it, run from the repository in the namespace of
    the cluster's bridge; its output goes to rundir/server.log."""
    rundir.mkdir(parents=True, exist_ok=True)
    with open(rundir / "server.log", "w") as out:
        return subprocess.Popen(
            ["ip", "netns", "exec", net.netns, "./forge", "pxe.serve", "--interface", net.bridge,
             "--inventory", str(INVENTORY.relative_to(REPO)), "--mode", mode, *paths],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


@contextmanager
def serving(net: ClusterNet, state: Path, rundir: Path, mode: str) -> Iterator[Site]:
    """The PXE server running on net (already created); stopped on exit, leaving no dnsmasq.
    With the repository's own state/, it runs exactly as typed (default paths)."""
    cluster = inventory.load(INVENTORY, state=state)
    net.add_address(cluster.network.boot_server)
    log = rundir / "server.log"
    paths = [] if state == DEFAULT_STATE else ["--state", str(state)]
    server = start_server(net, rundir, mode, *paths)
    try:
        deadline = time.monotonic() + 60
        while f"serving cluster {cluster.name}" not in log.read_text():
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield Site(inventory.load(INVENTORY, state=state), net, state, log)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        leftover = subprocess.run(["pgrep", "-f", f"dnsmasq.*pxe-{cluster.name}"], capture_output=True,
                                  text=True).stdout
        assert leftover == "", f"dnsmasq left running: {leftover}"


DEFAULT_STATE = REPO / "state"


@pytest.fixture(scope="module")
def state() -> Path:
    """The repository's own state/, as `./forge pxe.serve` uses it when typed as the README shows;
    both servers render the same files into the same dist."""
    return DEFAULT_STATE


@pytest.fixture(scope="module")
def site(build_ctx: BuildContext, state: Path) -> Iterator[Site]:
    """Full DHCP: the PXE server is the only DHCP server on an isolated network."""
    pipeline.build_netboot_files(build_ctx)
    cluster = inventory.load(INVENTORY)
    net = ClusterNet(cluster.name, cluster.network.subnet, cluster.network.gateway)
    net.create([n.name for n in cluster.nodes] + ["stranger"])
    try:
        with serving(net, state, RUNS / "pxe-server", "dhcp") as s:
            yield s
    finally:
        net.destroy()


@dataclass
class Router:
    """Another machine on the network that hands out addresses: a plain dnsmasq, no PXE."""

    netns: str
    address: str
    pool: tuple[str, str]


@contextmanager
def router_on(net: ClusterNet, rundir: Path) -> Iterator[Router]:
    router = Router(f"{net.netns}-rtr", str(net.subnet.network_address + 254),
                    (str(net.subnet.network_address + 100), str(net.subnet.network_address + 150)))
    run(["ip", "netns", "delete", router.netns], check=False)  # left by a killed run
    run(["ip", "netns", "add", router.netns])
    try:
        run(["ip", "-n", net.netns, "link", "add", "rtr0", "type", "veth", "peer", "name", "lan0",
             "netns", router.netns])
        run(["ip", "-n", net.netns, "link", "set", "rtr0", "master", net.bridge, "up"])
        run(["ip", "-n", router.netns, "addr", "add", f"{router.address}/{net.subnet.prefixlen}", "dev", "lan0"])
        run(["ip", "-n", router.netns, "link", "set", "lan0", "up"])
        rundir.mkdir(parents=True, exist_ok=True)
        log = rundir / "router.log"
        with open(log, "w") as out:
            dnsmasq = subprocess.Popen(
                ["ip", "netns", "exec", router.netns, "dnsmasq", "--keep-in-foreground", "--log-facility=-",
                 "--conf-file=/dev/null", "--port=0", "--interface=lan0", "--bind-interfaces",
                 f"--dhcp-range={router.pool[0]},{router.pool[1]},{net.subnet.netmask},1h",
                 f"--dhcp-option=option:router,{router.address}", f"--dhcp-leasefile={rundir / 'router.leases'}",
                 f"--pid-file={rundir / 'router.pid'}", "--user=root", "--group=root"],
                stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_log(log, "DHCP, sockets bound", 30)
            yield router
        finally:
            dnsmasq.terminate()
            try:
                dnsmasq.wait(timeout=10)
            except subprocess.TimeoutExpired:
                dnsmasq.kill()
                dnsmasq.wait()
    finally:
        run(["ip", "netns", "delete", router.netns])


@dataclass
class ProxySite:
    net: ClusterNet
    router: Router
    state: Path
    rundir: Path


@pytest.fixture(scope="module")
def proxy_net(build_ctx: BuildContext, state: Path) -> Iterator[ProxySite]:
    """A network whose addresses come from a router; clusterforge may only add boot instructions."""
    pipeline.build_netboot_files(build_ctx)
    cluster = inventory.load(INVENTORY)
    net = ClusterNet(f"{cluster.name}-proxy", cluster.network.subnet, cluster.network.gateway)
    net.create(["stranger"])
    rundir = RUNS / "pxe-proxy"
    try:
        with router_on(net, rundir) as router:
            yield ProxySite(net, router, state, rundir)
    finally:
        net.destroy()


def pxe_machine(site: Site, name: str, mac: str, rundir: Path, firmware: str, disk: bool) -> MachineSpec:
    drives: tuple[Drive, ...] = ()
    if disk:
        path = rundir / f"{name}.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "8G"])
        drives = (Drive(path, bootindex=2),)
    return MachineSpec(name=name, memory_mb=2048, cpus=2, firmware=firmware, drives=drives,
                       nics=(Nic(mac, site.net.netdev(name), bootindex=1),), netns=site.net.netns)


def install_then_boot_from_disk(site: Site, node: inventory.Node, rundir: Path, firmware: str) -> None:
    # state/ is the repository's own (pxe.serve as typed), kept across runs: the node may be
    # marked installed by an earlier run. Undone as the README says.
    forge("pxe.reinstall", node.name, "--inventory", str(INVENTORY.relative_to(REPO)))
    with Machine(pxe_machine(site, node.name, node.mac, rundir, firmware, disk=True), rundir) as m:
        m.wait_console(rf"machine {node.mac} is node {node.name}", 900, phase="installer")
        m.wait_console(rf"installed {node.name} on /dev/vda", 900, phase="installed")
        m.wait_console(rf"^{node.name} login: ", 600, phase="login")
        target = site.ssh(node)
        target.wait(120)
        assert target.run("hostname").stdout.strip() == node.name
        assert target.run("findmnt -n -o SOURCE /").stdout.strip() == "/dev/vda3"
        m.shutdown()
    log = site.log.read_text()
    assert f"{node.name} installed; it boots from its disk" in log
    localboot = f"{node.name} ({node.ip}): sent /images/netboot/localboot.efi" in log
    assert localboot == (firmware == "uefi"), log


@pytest.mark.all_only
def test_pxe_bios_install_then_boot_from_disk(site: Site, rundir: Path) -> None:
    """SeaBIOS: after the install, iPXE exits and the firmware boots the next device."""
    install_then_boot_from_disk(site, site.cluster.node("s1"), rundir, "bios")


@pytest.mark.all_only
def test_pxe_uefi_install_then_boot_from_disk(site: Site, rundir: Path) -> None:
    """OVMF: after the install, iPXE hands over to localboot.efi, which starts the disk's loader."""
    install_then_boot_from_disk(site, site.cluster.node("c1"), rundir, "uefi")


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
        wait_log(site.log, f"unknown machine {STRANGER} reported itself", 300)
    record = Discoveries(site.state / site.cluster.name, site.cluster).load()[STRANGER]
    assert {"platform", "ip", "uuid", "manufacturer", "product"} <= record.keys(), record  # all it reported
    listed = Discoveries(site.state / site.cluster.name, site.cluster).as_inventory()
    assert f'- mac: "{STRANGER}"' in listed


def test_dhcp_mode_refuses_beside_another_dhcp_server(build_ctx: BuildContext, proxy_net: ProxySite) -> None:
    rundir = proxy_net.rundir / "refused"
    server = start_server(proxy_net.net, rundir, "dhcp")
    try:
        code = server.wait(timeout=60)
    except subprocess.TimeoutExpired:  # it served: stop it, and its dnsmasq with it
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        raise AssertionError(f"it served beside another DHCP server:\n{(rundir / 'server.log').read_text()}") from None
    assert code != 0
    output = (rundir / "server.log").read_text()
    assert f"another DHCP server ({proxy_net.router.address}) answers on br0" in output, output
    assert "--mode proxy" in output


@pytest.mark.all_only
def test_proxy_mode_beside_a_router(build_ctx: BuildContext, proxy_net: ProxySite, rundir: Path) -> None:
    """The router hands out the address, the PXE server only the boot instructions: an unknown
    machine gets iPXE's menu from clusterforge and is recorded with the router's address."""
    with serving(proxy_net.net, proxy_net.state, proxy_net.rundir / "server", "proxy") as site:
        with Machine(pxe_machine(site, "stranger", STRANGER, rundir, "bios", disk=False), rundir):
            wait_log(site.log, f"unknown machine {STRANGER} reported itself", 300)
        record = Discoveries(site.state / site.cluster.name, site.cluster).load()[STRANGER]
    first, last = (IPv4Address(a) for a in proxy_net.router.pool)
    assert first <= IPv4Address(record["ip"]) <= last, record
