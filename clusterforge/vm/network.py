"""Networks for VMs.

- `user_net`: QEMU's user-mode network carrying the inventory's subnet, with the
  host's loopback forwarded to one node's SSH. One machine, no root needed.
- `ClusterNet`: one L2 segment for a whole cluster: a bridge with a tap per node
  inside a network namespace of its own (root). The host side of the bridge holds
  the gateway address, so nodes reach it and it reaches every node; nothing of the
  host's own networking is touched.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from ..run import CommandError, in_netns, run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def user_net(subnet: IPv4Network, gateway: IPv4Address, forwards: dict[int, tuple[IPv4Address, int]],
             dhcp_start: IPv4Address | None = None) -> str:
    """-netdev value: user-mode network on the subnet, the host forwarding ports to guests.
    A DHCP client gets dhcp_start first (the node's inventory address, as dnsmasq would give)."""
    parts = ["user", f"net={subnet}", f"host={gateway}", f"dns={subnet.network_address + 3}"]
    parts += [f"dhcpstart={dhcp_start}"] if dhcp_start else []
    parts += [f"hostfwd=tcp:127.0.0.1:{port}-{ip}:{guest}" for port, (ip, guest) in forwards.items()]
    return ",".join(parts)


@dataclass(frozen=True)
class ClusterNet:
    """A bridge in network namespace `cf-<cluster>`; taps are named per node."""

    cluster: str
    subnet: IPv4Network
    gateway: IPv4Address

    @property
    def netns(self) -> str:
        return f"cf-{self.cluster}"

    @property
    def bridge(self) -> str:
        return "br0"

    def tap(self, node: str) -> str:
        return f"tap-{node}"[:15]  # interface names are at most 15 characters

    def _ip(self, *args: str, check: bool = True) -> None:
        run(["ip", "-n", self.netns, *args], check=check)

    def exists(self) -> bool:
        return self.netns in run(["ip", "netns", "list"]).stdout.split()

    def create(self, nodes: list[str]) -> None:
        """Idempotent: the namespace, the bridge with the gateway address, a tap per node."""
        if not self.exists():
            run(["ip", "netns", "add", self.netns])
        self._ip("link", "set", "lo", "up")
        if run(["ip", "-n", self.netns, "link", "show", self.bridge], check=False).returncode != 0:
            self._ip("link", "add", self.bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0")
            self._ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        for node in nodes:
            tap = self.tap(node)
            if run(["ip", "-n", self.netns, "link", "show", tap], check=False).returncode != 0:
                self._ip("tuntap", "add", "dev", tap, "mode", "tap")
                self._ip("link", "set", tap, "master", self.bridge)
            self._ip("link", "set", tap, "up")

    def add_address(self, address: IPv4Address) -> None:
        """Another host-side address on the bridge (the PXE server's boot_server)."""
        have = run(["ip", "-n", self.netns, "-4", "-o", "addr", "show", "dev", self.bridge]).stdout
        if f" {address}/" not in have:
            self._ip("addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", self.bridge)

    def http_get(self, url: str, timeout: float) -> str | None:
        """The body at url, fetched from inside the namespace; None if nothing answers with 2xx."""
        try:
            proc = run(in_netns(self.netns, ["curl", "-sf", "-m", f"{timeout:.0f}", url]),
                       check=False, timeout=timeout + 10)
        except CommandError:  # hung past curl's own limit: no answer either
            return None
        return proc.stdout if proc.returncode == 0 else None

    def netdev(self, node: str) -> str:
        return f"tap,ifname={self.tap(node)},script=no,downscript=no"

    def destroy(self) -> None:
        if self.exists():
            run(["ip", "netns", "delete", self.netns])
