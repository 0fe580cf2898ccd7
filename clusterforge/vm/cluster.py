"""An inventory as a running cluster of QEMU machines.

Each node gets its MAC, its seed ISO, a copy-on-write overlay of the built image
and the data disks its inventory entry names; all share one L2 segment (see
network.ClusterNet). With a K3s air-gap bundle in the inventory, every node also
gets it as a read-only drive labelled CF-K3S (an ISO built from the bundle into the
run directory), so the image stays the same for every cluster. QEMU outlives the
command that started it: every command finds the machines again through their run
directory, runs/<cluster>/<node>/.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .. import k3sbundle
from ..inventory import BootMode, Cluster, Disk, Node, Role
from ..log import die, info
from ..paths import REPO, Paths
from ..run import in_netns, run, spawn
from ..ssh import Target
from .accel import Accel, choose
from .machine import Drive, Machine, MachineError, MachineSpec, Nic, boot_phases
from .network import ClusterNet

NETBOOT_MARK = "netboot"  # in runs/<cluster>/<node>/: the machine came as new hardware, network first
MAC_FILE = "mac"  # in runs/<cluster>/<node>/: the MAC of the machine whose disks are there
DATA_DISK_SIZE = "12G"
ROOT_DISK_SIZE = "8G"  # Ceph wants >= 5 GB per OSD; ceph-volume is happier with more
BOOT_TIMEOUT = 900.0
INSTALL_TIMEOUT = 2400.0  # a node installing from the network: the live system, the image, a reboot (TCG)


@dataclass(frozen=True)
class Sizing:
    memory_mb: int
    cpus: int


# The memory a node needs for its roles (README: memory per role): a Ceph monitor, manager and
# OSD with its cache fit in 3 GiB; a node without Ceph daemons needs far less.
MIN_MEMORY_MB = {"ceph": 3072, "other": 1024}
MAX_MEMORY_MB = 4096
HOST_SHARE = 0.75  # of the host's memory, for all the nodes together


def memory_needed(node: Node, cluster: Cluster) -> int:
    ceph = cluster.services.ceph and (node.has(Role.CORE) or (node.has(Role.STORAGE) and node.disks))
    return MIN_MEMORY_MB["ceph" if ceph else "other"]


def size_for(node: Node, cluster: Cluster, accel: Accel) -> Sizing:
    """Each node the memory its roles need, and a fair share of what is left of three quarters
    of the host's memory (at most 4 GiB); the host's cores shared out (at least one each)."""
    total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    nodes = max(len(cluster.nodes), 1)
    needs = {n.name: memory_needed(n, cluster) for n in cluster.nodes}
    spare = max(0, int(total_mb * HOST_SHARE) - sum(needs.values())) // nodes
    memory = min(MAX_MEMORY_MB, needs.get(node.name, MIN_MEMORY_MB["other"]) + spare)
    cores = os.cpu_count() or 1
    cpus = max(1, min(4 if accel.is_kvm else 2, cores // nodes))
    return Sizing(memory, cpus)


def data_disk(node_dir: Path, index: int, disk: Disk) -> Drive:
    """A data disk as the inventory names it: /dev/vdb-style names come from the order, and
    a /dev/disk/by-id/virtio-SERIAL path from the disk's serial number, as on metal."""
    serial = disk.path.rsplit("/", 1)[-1].removeprefix("virtio-")[:20] if "/by-id/" in disk.path else f"data{index}"
    return Drive(node_dir / f"data-{index}.qcow2", serial=serial)


class ClusterVMs:
    def __init__(self, cluster: Cluster, image: Path, paths: Paths, boot: str = "disk"):
        self.cluster = cluster
        self.image = image
        self.paths = paths
        self.seeds = paths.rendered(cluster.name)
        self.ssh_key = paths.cluster_state(cluster.name) / "ssh" / "id_ed25519"
        self.dir = paths.cluster_runs(cluster.name)
        self.boot = boot
        self.net = ClusterNet(cluster.name, cluster.network.subnet, cluster.network.gateway)
        self._accel: Accel | None = None
        self._machines: dict[str, Machine] = {}

    @property
    def accel(self) -> Accel:
        if self._accel is None:
            self._accel = choose(self.paths.out)
        return self._accel

    @property
    def k3s_drive(self) -> Path:
        """The K3s bundle as a drive image, shared (read-only) by every node of the cluster."""
        return self.dir / "k3s-bundle.iso"

    # ------------------------------------------------------------ machines

    def netboots(self, node: Node) -> bool:
        """The machine boots from the network first: the whole cluster over PXE (--boot pxe), or
        a node that came later as new hardware does (see start())."""
        return self.boot == "pxe" or (self.dir / node.name / NETBOOT_MARK).exists()

    def spec(self, node: Node) -> MachineSpec:
        sizing = size_for(node, self.cluster, self.accel)
        node_dir = self.dir / node.name
        netboot = self.netboots(node)
        drives = []
        if not (netboot and node.boot == BootMode.DISKLESS):
            drives.append(Drive(node_dir / "root.qcow2", bootindex=2 if netboot else 1))
        drives += [data_disk(node_dir, i, d) for i, d in enumerate(node.disks)]
        if not netboot:  # over PXE the seed comes from the server
            drives.append(Drive(self.seeds / "nodes" / node.name / "seed.iso", format="raw", media="cdrom"))
        if self.cluster.services.k3s_bundle is not None:  # beside the image, never in it
            drives.append(Drive(self.k3s_drive, format="raw", media="cdrom", readonly=True))
        nic = Nic(node.mac, self.net.netdev(node.name), bootindex=1 if netboot else None)
        return MachineSpec(name=node.name, memory_mb=sizing.memory_mb, cpus=sizing.cpus,
                           drives=tuple(drives), nics=(nic,), netns=self.net.netns)

    def machine(self, node: Node) -> Machine:
        if node.name not in self._machines:
            self._machines[node.name] = Machine(self.spec(node), self.dir, self.accel)
        return self._machines[node.name]

    def nodes(self, names: Iterable[str] | None = None) -> list[Node]:
        if names is None:
            return list(self.cluster.nodes)
        known = {n.name: n for n in self.cluster.nodes}
        for name in names:
            if name not in known:
                die(f"no node named '{name}' in cluster {self.cluster.name}",
                    hint="nodes: " + ", ".join(known))
        return [known[name] for name in names]

    def ssh(self, node: Node) -> Target:
        return Target(str(node.ip), self.ssh_key, netns=self.net.netns)

    def _prepare_disks(self, node: Node) -> None:
        node_dir = self.dir / node.name
        node_dir.mkdir(parents=True, exist_ok=True)
        (node_dir / MAC_FILE).write_text(f"{node.mac}\n")
        root = node_dir / "root.qcow2"
        if not root.exists() and not self.netboots(node):
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(self.image.resolve()),
                 str(root)])
        elif not root.exists():  # PXE installs onto an empty disk
            run(["qemu-img", "create", "-q", "-f", "qcow2", str(root), ROOT_DISK_SIZE])
        for i, disk in enumerate(node.disks):
            data = data_disk(node_dir, i, disk).path
            if not data.exists():
                run(["qemu-img", "create", "-q", "-f", "qcow2", str(data), DATA_DISK_SIZE])

    # ------------------------------------------------------------ tasks

    def up(self, names: Iterable[str] | None = None, timeout: float = BOOT_TIMEOUT) -> dict[str, dict[str, float]]:
        """Start the nodes that are not running and wait until each answers SSH with its seed applied."""
        if not self.image.exists():
            die(f"image not found: {self.image}", hint="build it with ./forge image"
                + (f" --os {self.cluster.os} --iso PATH" if self.cluster.os != "debian-12" else ""))
        if not self.seeds.is_dir():
            die(f"no rendered seeds in {self.seeds}", hint="./forge render (with the same --out)")
        nodes = self.nodes(names)
        if self.cluster.services.k3s_bundle is not None:
            k3sbundle.write_drive(k3sbundle.require(self.cluster.services.k3s_bundle), self.k3s_drive)
        self.net.create([n.name for n in self.cluster.nodes])
        if self.boot == "pxe":
            self.start_pxe_server()
        started = []
        for node in nodes:
            m = self.machine(node)
            if m.running:
                info(f"{node.name}: already running")
                continue
            self._prepare_disks(node)
            m.start()
            started.append(node)
            info(f"{node.name}: started ({self.accel.name}, {m.spec.cpus} vCPU, {m.spec.memory_mb} MiB)")
        try:
            self.wait_ready(started, timeout)
        finally:
            for node in started:
                self.machine(node).close()  # QEMU serves one monitor client: leave it free for the next command
        timeline = {n.name: {**self.machine(n).timeline.phases, "at": round(self.machine(n).timeline.at, 2)}
                    for n in started}
        self._record_timeline(timeline)
        return timeline

    def wait_ready(self, nodes: list[Node], timeout: float) -> None:
        """Watch every node's console for the boot phases, then SSH: hostname and cloud-init done."""
        deadline = time.monotonic() + timeout
        phases = [(name, re.compile(pattern, re.MULTILINE)) for name, pattern in boot_phases()
                  if name != "seed"]  # the console may go quiet once the serial getty starts: SSH says
        waiting = {n.name for n in nodes}
        while waiting:
            for node in nodes:
                m = self.machine(node)
                text = m.console_text()
                for name, pattern in phases:
                    if name not in m.timeline.phases and pattern.search(text):
                        m.timeline.mark(name)
                if "multi-user" in m.timeline.phases:
                    waiting.discard(node.name)
                elif not m.running:
                    raise m.error("QEMU exited during boot")
            if waiting and time.monotonic() > deadline:
                raise MachineError(f"boot timed out after {timeout:.0f}s: {', '.join(sorted(waiting))} did not "
                                   f"reach multi-user; logs in {self.dir}/<node>/")
            time.sleep(0.5)  # consoles are log files: poll them
        for node in nodes:
            m = self.machine(node)
            out = self.ssh(node).wait(max(30.0, deadline - time.monotonic()), "cloud-init status --wait >/dev/null; "
                                      "hostname", command_timeout=600).stdout.strip()
            if out != node.name:
                raise m.error(f"hostname is '{out}', expected '{node.name}': the seed was not applied")
            m.timeline.mark("seed")
            m.timeline.mark("ssh")
            info(f"{node.name}: ready at {node.ip} after {m.timeline.phases['ssh']:.0f}s")

    def _record_timeline(self, timeline: dict[str, dict[str, float]]) -> None:
        path = self.dir / "timeline.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        old.update(timeline)
        path.write_text(json.dumps(old, indent=2) + "\n")

    def status(self) -> list[dict[str, object]]:
        rows = []
        for node in self.cluster.nodes:
            m = self.machine(node)
            row: dict[str, object] = {"node": node.name, "ip": str(node.ip), "state": "off",
                                      "uptime": None, "phase": None}
            pid = m.pid()
            if pid is not None:
                try:
                    m.attach()
                    row["state"] = m.status()
                finally:
                    m.close()
                row["uptime"] = round(time.time() - Path(f"/proc/{pid}").stat().st_mtime)
            text = m.console_log.read_text(errors="replace") if m.console_log.exists() else ""
            reached = [name for name, pattern in boot_phases() if _search(pattern, text)]
            row["phase"] = reached[-1] if reached else None
            rows.append(row)
        return rows

    def down(self, timeout: float = 120) -> None:
        """ACPI power-off for every node at once, then quit; kill what ignores it. Nothing stays."""
        running = [n for n in self.cluster.nodes if self.machine(n).running]
        for node in running:
            m = self.machine(node)
            m.attach()
            m.qmp("system_powerdown")
        deadline = time.monotonic() + timeout
        while any(self.machine(n).running for n in running) and time.monotonic() < deadline:
            time.sleep(0.5)  # guests shutting down: QEMU exits when they power off
        for node in running:
            self.machine(node).kill()
        self.stop_pxe_server()
        self.net.destroy()

    # ------------------------------------------------------------ PXE

    @property
    def pxe_pidfile(self) -> Path:
        return self.dir / "pxe-server.pid"

    def start_pxe_server(self) -> None:
        """The PXE server on the cluster's bridge, as the boot server; outlives this command."""
        if self._pxe_pid() is not None:
            return
        self.net.add_address(self.cluster.network.boot_server)
        self.dir.mkdir(parents=True, exist_ok=True)
        log = self.dir / "pxe-server.log"
        with open(log, "a") as out:
            proc = spawn(in_netns(self.net.netns, [
                REPO / "forge", "pxe.serve", "--inventory", str(self.cluster.source.resolve()),
                "--interface", self.net.bridge, "--out", str(self.paths.out), "--state", str(self.paths.state),
                "--runs", str(self.paths.runs)]), stdout=out, stderr=subprocess.STDOUT,
                         start_new_session=True)
        self.pxe_pidfile.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + 60
        while "serving cluster" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise MachineError(f"the PXE server did not start; its log: {log}")
            time.sleep(0.2)  # its log is how it says it is ready
        info(f"PXE server on {self.cluster.network.boot_server} (log: {log})")

    def _pxe_pid(self) -> int | None:
        try:
            pid = int(self.pxe_pidfile.read_text())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def stop_pxe_server(self) -> None:
        pid = self._pxe_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.1)  # it stops dnsmasq and its HTTP server first
        self.pxe_pidfile.unlink(missing_ok=True)

    def destroy(self) -> None:
        self.down(timeout=30)
        run(["rm", "-rf", "--one-file-system", str(self.dir)])

    def kill(self, name: str) -> None:
        self.machine(self.nodes([name])[0]).kill()

    def start(self, name: str, timeout: float = BOOT_TIMEOUT) -> None:
        """Start a node again; a node of a running cluster that has never run comes as new
        hardware would: an empty disk, booting from the network (the cluster's own PXE)."""
        node = self.nodes([name])[0]
        self._retire_replaced(node)
        if self.never_ran(node) and any(self.machine(n).running for n in self.cluster.nodes if n != node):
            (self.dir / node.name).mkdir(parents=True, exist_ok=True)
            (self.dir / node.name / NETBOOT_MARK).write_text("came as new hardware: network first, empty disk\n")
            info(f"{node.name}: never ran: an empty disk, booting from the network")
        if self.netboots(node) and node.boot == BootMode.INSTALL and not (self.dir / node.name / "root.qcow2").exists():
            timeout = max(timeout, INSTALL_TIMEOUT)
        self.up([name], timeout)

    def _retire_replaced(self, node: Node) -> None:
        """A node whose MAC changed (cluster.replace) is other hardware: the old machine's disks
        and logs are moved aside, to runs/<cluster>/<node>.retired-<mac>/, and the new machine
        comes with empty disks, as new hardware does."""
        node_dir = self.dir / node.name
        try:
            old = (node_dir / MAC_FILE).read_text().strip()
        except OSError:
            return
        if old == node.mac:
            return
        if self.machine(node).running:
            die(f"{node.name}'s old machine ({old}) is still running", hint=f"./forge cluster.kill {node.name}")
        self._machines.pop(node.name, None)
        retired = self.dir / f"{node.name}.retired-{old.replace(':', '-')}"
        node_dir.rename(retired)
        info(f"{node.name}: {old} was replaced by {node.mac}; the old machine is kept in {retired}")

    def never_ran(self, node: Node) -> bool:
        node_dir = self.dir / node.name
        return not (node_dir / "root.qcow2").exists() and not (node_dir / NETBOOT_MARK).exists()

    def set_link(self, name: str, up: bool) -> None:
        m = self.machine(self.nodes([name])[0]).attach()
        try:
            m.set_link(up)
        finally:
            m.close()

    def pause(self, pause: bool) -> None:
        for node in self.cluster.nodes:
            m = self.machine(node)
            if m.running:
                m.attach()
                try:
                    m.qmp("stop" if pause else "cont")
                finally:
                    m.close()


def _search(pattern: str, text: str) -> bool:
    return re.search(pattern, text, re.MULTILINE) is not None

