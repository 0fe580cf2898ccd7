"""`pxe.serve`: dnsmasq for DHCP (full or proxy) and TFTP of Debian's iPXE binaries, and
an HTTP server for scripts, kernels, squashfs, images and seeds, on one interface.

Runs in the foreground, logging who booted what; Ctrl-C (or SIGTERM) stops everything.
"""

from __future__ import annotations

import json
import queue
import random
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from types import FrameType

from ..inventory import HTTP_PORT, Cluster
from ..log import die, info
from ..node.pxeserve import IPXE_DIR, IPXE_FILES
from ..paths import Paths
from ..render import Site, dnsmasq_conf, render
from ..run import run, spawn
from .discovery import Discoveries
from .http import HttpServer, Installed, make_handler

NETBOOT_FILES = ("netboot/vmlinuz", "netboot/initrd.img", "netboot/root.squashfs", "netboot/localboot.efi")
# dnsmasq logs this once its DHCP sockets are bound and TFTP is set up: it is serving.
DNSMASQ_READY = "TFTP root is"
DNSMASQ_START_SECONDS = 30.0
# How long to listen for another DHCP server's offer. Servers check that an address is
# free before offering it (dnsmasq pings it for 3 s, ISC dhcpd for 1 s), so the probe,
# like a real client, listens longer than that and repeats its DHCPDISCOVER.
DHCP_PROBE_SECONDS = 6.0
DHCP_PROBE_RESEND_SECONDS = 2.0
# dnsmasq lines worth showing: leases handed out and files sent over TFTP.
INTERESTING = ("DHCPACK", "PXE(", "sent /", "failed sending", "error", "warning")


def interface_address(interface: str, cluster: Cluster) -> IPv4Address:
    """The interface's address in the inventory's subnet; refuses to serve without one."""
    proc = run(["ip", "-j", "-4", "addr", "show", "dev", interface], check=False)
    if proc.returncode != 0:
        die(f"no network interface '{interface}'", hint="list them with: ip -br addr")
    addresses = [IPv4Interface(f"{a['local']}/{a['prefixlen']}")
                 for entry in json.loads(proc.stdout or "[]") for a in entry.get("addr_info", [])]
    inside = [a.ip for a in addresses if a.ip in cluster.network.subnet]
    if cluster.network.boot_server in inside:  # the address the rendered files name
        return cluster.network.boot_server
    if inside:
        return inside[0]
    have = ", ".join(str(a) for a in addresses) or "no IPv4 address"
    die(f"interface {interface} has no address in the cluster's subnet {cluster.network.subnet} ({have})",
        hint=f"give it one, e.g.: ip addr add {cluster.network.boot_server}/{cluster.network.subnet.prefixlen} "
             f"dev {interface}")


def check_artifacts(images: Path, image_name: str) -> None:
    missing = [name for name in (*NETBOOT_FILES, f"{image_name}.raw.gz") if not (images / name).exists()]
    if missing:
        die(f"netboot artifacts missing in {images}: {', '.join(missing)}", hint="build them with: ./forge netboot")
    missing = [name for name in IPXE_FILES if not (IPXE_DIR / name).exists()]
    if missing:
        die(f"iPXE binaries missing in {IPXE_DIR}: {', '.join(missing)}", hint="apt-get install ipxe")


def other_dhcp_server(interface: str) -> str | None:
    """Broadcast a DHCPDISCOVER on the interface; the address of whoever offers, if anyone."""
    xid = random.getrandbits(32)
    mac = bytes([0x02, *random.randbytes(5)])  # locally administered: nobody's real NIC
    packet = struct.pack("!BBBBIHH4s4s4s4s16s192xI", 1, 1, 6, 0, xid, 0, 0x8000, bytes(4), bytes(4), bytes(4),
                         bytes(4), mac.ljust(16, b"\0"), 0x63825363)
    packet += bytes([53, 1, 1, 255])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        s.bind(("0.0.0.0", 68))
        now = time.monotonic()
        deadline, resend = now + DHCP_PROBE_SECONDS, now
        while (now := time.monotonic()) < deadline:
            if now >= resend:
                s.sendto(packet, ("255.255.255.255", 67))
                resend = now + DHCP_PROBE_RESEND_SECONDS
            s.settimeout(min(resend, deadline) - now)
            try:
                data, (sender, _) = s.recvfrom(2048)
            except TimeoutError:
                continue
            if len(data) > 240 and data[0] == 2 and struct.unpack("!I", data[4:8])[0] == xid:
                return str(sender)
    return None


@dataclass
class PxeServer:
    cluster: Cluster
    interface: str
    mode: str
    paths: Paths

    def serve(self) -> None:
        if self.mode not in ("dhcp", "proxy"):
            die(f"--mode must be dhcp or proxy, not '{self.mode}'")
        address = interface_address(self.interface, self.cluster)
        images = self.paths.images
        check_artifacts(images, self.cluster.image_name)
        state = self.paths.cluster_state(self.cluster.name)
        installed = Installed(state)
        installed.all()  # refuses a damaged file before anything starts
        discoveries = Discoveries(state, self.cluster)
        discoveries.load()
        if self.mode == "dhcp":
            other = other_dhcp_server(self.interface)
            if other:
                die(f"another DHCP server ({other}) answers on {self.interface}",
                    hint="use --mode proxy beside an existing DHCP server")
        site = Site(address, HTTP_PORT)
        rendered = render(self.cluster, self.paths.out, self.paths.state, site).path
        rundir = self.paths.runs / f"pxe-{self.cluster.name}"
        rundir.mkdir(parents=True, exist_ok=True)
        conf = rundir / "dnsmasq.conf"
        conf.write_text(dnsmasq_conf(self.cluster, site, self.mode))

        handler = make_handler(self.cluster, rendered, images, discoveries, installed, info,
                               seeds_by_address=self.mode == "dhcp")
        try:
            http = HttpServer((str(address), site.port), handler)
        except OSError as exc:
            die(f"cannot serve HTTP on {address}:{site.port}: {exc.strerror}",
                hint="is another PXE server (or anything else) listening there?")
        http_thread = threading.Thread(target=http.serve_forever, daemon=True)
        dnsmasq: subprocess.Popen[bytes] | None = None
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            http_thread.start()
            dnsmasq = spawn(["dnsmasq", "--keep-in-foreground", "--log-facility=-", f"--conf-file={conf}",
                             f"--interface={self.interface}", "--bind-interfaces", "--except-interface=lo",
                             f"--tftp-root={IPXE_DIR}", f"--dhcp-leasefile={rundir / 'leases'}",
                             f"--pid-file={rundir / 'dnsmasq.pid'}", "--user=root", "--group=root"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            lines = _lines(dnsmasq)
            _wait_ready(dnsmasq, lines, conf)
            info(f"serving cluster {self.cluster.name} on {self.interface} ({address}), {self.mode} mode: "
                 f"TFTP {IPXE_DIR}, HTTP {site.base_url}/ ; Ctrl-C stops")
            tail: deque[str] = deque(maxlen=10)
            while (line := lines.get()) is not None:
                tail.append(line)
                if any(word in line for word in INTERESTING):
                    info(f"dnsmasq: {line.split(': ', 1)[-1]}")
            code = dnsmasq.wait()
            if code != 0:
                die(f"dnsmasq exited with status {code}:\n  " + "\n  ".join(tail),
                    hint=f"its configuration: {conf}")
        except KeyboardInterrupt:
            info("stopping")
        finally:
            signal.signal(signal.SIGTERM, previous)
            if dnsmasq is not None and dnsmasq.poll() is None:
                dnsmasq.terminate()
                try:
                    dnsmasq.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    dnsmasq.kill()
                    dnsmasq.wait()
            http.shutdown()
            http.server_close()


def _lines(proc: subprocess.Popen[bytes]) -> queue.Queue[str | None]:
    """dnsmasq's log lines as they come (None at its end), read by a thread so that waiting
    for one can time out."""
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            text = raw.decode(errors="replace").strip()
            if text:
                lines.put(text)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    return lines


def _wait_ready(dnsmasq: subprocess.Popen[bytes], lines: queue.Queue[str | None], conf: Path) -> None:
    """Until dnsmasq says it serves; if it exits first, its own words are the error."""
    said: list[str] = []
    deadline = time.monotonic() + DNSMASQ_START_SECONDS
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            code = dnsmasq.wait()
            die(f"dnsmasq exited with status {code}:\n  " + "\n  ".join(said[-10:] or ["(it printed nothing)"]),
                hint=f"its configuration: {conf}")
        said.append(line)
        if DNSMASQ_READY in line:
            return
    die(f"dnsmasq did not start serving within {DNSMASQ_START_SECONDS:.0f}s:\n  " + "\n  ".join(said[-10:]),
        hint=f"its configuration: {conf}")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt

