"""The cluster inventory: one frozen, typed model, loaded and validated once.

Nothing past this module touches raw YAML. Every user error names the file,
line and field (see yamlsource.Field).
"""

from __future__ import annotations

import ipaddress
import json
import re
import zoneinfo
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from . import yamlsource
from .yamlsource import Field, Section, Value

SCHEMA_VERSION = 1
HTTP_PORT = 8080  # where the PXE server's HTTP side listens; iPXE scripts point at it
IMAGE_NAME = "clusterforge-debian-12"  # the node image's file names, which iPXE scripts name too
RESERVED_NAMES = {"images", "release", "cache", "runs", "netboot"}  # siblings in dist/


class Role(StrEnum):
    CORE = "core"
    STORAGE = "storage"
    COMPUTE = "compute"
    FRONTEND = "frontend"


class OS(StrEnum):
    DEBIAN_12 = "debian-12"
    UBUNTU_2404 = "ubuntu-24.04"


class BootMode(StrEnum):
    INSTALL = "install"
    DISKLESS = "diskless"


@dataclass(frozen=True)
class NamePlan:
    """Default names and addresses by role: prefix and host-number range in the subnet."""

    prefix: str
    first_host: int
    last_host: int


# Precedence matters for nodes with several roles: core/storage, then frontend, then compute.
NAME_PLANS: tuple[tuple[frozenset[Role], NamePlan], ...] = (
    (frozenset({Role.CORE, Role.STORAGE}), NamePlan("s", 11, 30)),
    (frozenset({Role.FRONTEND}), NamePlan("f", 91, 99)),
    (frozenset({Role.COMPUTE}), NamePlan("c", 51, 70)),
)


def plan_for(roles: tuple[Role, ...]) -> NamePlan:
    for group, plan in NAME_PLANS:
        if group & set(roles):
            return plan
    raise AssertionError(f"no name plan for roles {roles}")


@dataclass(frozen=True)
class Node:
    name: str
    mac: str  # normalised: lower case, colon separated
    roles: tuple[Role, ...]
    ip: IPv4Address
    overlay_ip: IPv4Address
    disks: tuple[str, ...]
    boot: BootMode

    def has(self, role: Role) -> bool:
        return role in self.roles

    @property
    def mac_hyphen(self) -> str:
        """The MAC as iPXE's ${mac:hexhyp} spells it: the name of the node's iPXE script."""
        return self.mac.replace(":", "-")


@dataclass(frozen=True)
class Network:
    subnet: IPv4Network
    gateway: IPv4Address
    dns: tuple[IPv4Address, ...]
    vip: IPv4Address
    overlay: IPv4Network
    boot_server: IPv4Address


@dataclass(frozen=True)
class Services:
    etcd: bool = True
    ceph: bool = True
    wireguard: bool = True
    slurm: bool = True
    k3s: bool = False
    k3s_bundle: Path | None = None


@dataclass(frozen=True)
class Cluster:
    name: str
    domain: str
    os: OS
    timezone: str
    network: Network
    ssh_authorized_keys: tuple[str, ...]
    services: Services
    nodes: tuple[Node, ...]
    source: Path = field(compare=False)

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def with_role(self, role: Role) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if n.has(role))

    def fqdn(self, node: Node) -> str:
        return f"{node.name}.{self.domain}"

    def to_dict(self) -> dict[str, Any]:
        """The resolved inventory (every default filled in), as written to inventory.json."""
        services = self.services
        return {
            "schema": SCHEMA_VERSION,
            "cluster": {"name": self.name, "domain": self.domain, "os": str(self.os),
                        "timezone": self.timezone},
            "network": {
                "subnet": str(self.network.subnet), "gateway": str(self.network.gateway),
                "dns": [str(a) for a in self.network.dns], "vip": str(self.network.vip),
                "overlay": str(self.network.overlay),
                "boot_server": str(self.network.boot_server),
            },
            "access": {"ssh_authorized_keys": list(self.ssh_authorized_keys)},
            "services": {
                "etcd": services.etcd, "ceph": services.ceph, "wireguard": services.wireguard,
                "slurm": services.slurm, "k3s": services.k3s,
                "k3s_bundle": str(services.k3s_bundle) if services.k3s_bundle else None,
            },
            "nodes": [
                {"name": n.name, "mac": n.mac, "roles": [str(r) for r in n.roles],
                 "ip": str(n.ip), "overlay_ip": str(n.overlay_ip), "disks": list(n.disks),
                 "boot": str(n.boot), "fqdn": self.fqdn(n)}
                for n in self.nodes
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


# ---------------------------------------------------------------- parsers

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_MAC_FORMS = (
    re.compile(r"^([0-9a-f]{2})([:-])([0-9a-f]{2})\2([0-9a-f]{2})\2([0-9a-f]{2})\2([0-9a-f]{2})\2([0-9a-f]{2})$"),
    re.compile(r"^([0-9a-f]{4})\.([0-9a-f]{4})\.([0-9a-f]{4})$"),
    re.compile(r"^([0-9a-f]{12})$"),
)
_SSH_KEY = re.compile(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp\d+|sk-\S+@openssh\.com) [A-Za-z0-9+/=]+( .*)?$")


def parse_mac(value: Value) -> str:
    """Accept aa:bb:.., AA-BB-.., aabb.ccdd.eeff and aabbccddeeff; return aa:bb:cc:dd:ee:ff."""
    text = value.expect(str).strip().lower()
    for form in _MAC_FORMS:
        match = form.match(text)
        if match:
            digits = "".join(g for g in match.groups() if g not in (":", "-"))
            mac = ":".join(digits[i:i + 2] for i in range(0, 12, 2))
            if int(digits[:2], 16) & 1:
                value.at.fail(f"'{value.raw}' is a multicast address, not a NIC's MAC")
            return mac
    value.at.fail(f"'{value.raw}' is not a MAC address",
                  hint="write it as 52:54:00:12:34:56, 52-54-00-12-34-56 or 5254.0012.3456")


def parse_label(value: Value, what: str) -> str:
    text = value.expect(str)
    if not _LABEL.match(text):
        value.at.fail(f"'{text}' is not a valid {what}",
                      hint="use 1-63 lower-case letters, digits and '-', not starting or ending with '-'")
    return text


def parse_domain(value: Value) -> str:
    text = value.expect(str).rstrip(".")
    if len(text) > 253 or not all(_LABEL.match(p) for p in text.split(".")):
        value.at.fail(f"'{value.raw}' is not a valid DNS domain")
    return text


def parse_address(value: Value) -> IPv4Address:
    try:
        return IPv4Address(value.expect(str))
    except ipaddress.AddressValueError:
        value.at.fail(f"'{value.raw}' is not an IPv4 address")


def parse_network(value: Value) -> IPv4Network:
    text = value.expect(str)
    try:
        return IPv4Network(text)
    except ValueError as exc:
        value.at.fail(f"'{text}' is not an IPv4 network in CIDR form ({exc})",
                      hint="for example 10.0.0.0/24")


def parse_enum(value: Value, enum: type[StrEnum]) -> Any:
    text = value.expect(str)
    try:
        return enum(text)
    except ValueError:
        choices = ", ".join(e.value for e in enum)
        value.at.fail(f"'{text}' is not one of: {choices}")


def parse_timezone(value: Value) -> str:
    text = value.expect(str)
    try:
        zoneinfo.ZoneInfo(text)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        value.at.fail(f"'{text}' is not a known time zone", hint="for example UTC or Europe/Berlin")
    return text


def parse_ssh_key(value: Value) -> str:
    text = value.expect(str).strip()
    if not _SSH_KEY.match(text):
        value.at.fail("not an SSH public key", hint="paste a line of ~/.ssh/id_ed25519.pub")
    return text


# ---------------------------------------------------------------- loading

def load(path: Path | str) -> Cluster:
    path = Path(path)
    top = Value(yamlsource.load(path), Field(path, 1, ""))
    if top.raw is None:
        top.at.fail("the inventory is empty")
    doc = Section(top, ("cluster", "network", "access", "services", "nodes"))

    cluster = Section(doc.require("cluster"), ("name", "domain", "os", "timezone"))
    name = parse_label(cluster.require("name"), "cluster name")
    if name in RESERVED_NAMES:
        cluster.field("name").fail(f"'{name}' is reserved (it names a folder in dist/)")
    domain = parse_domain(cluster.get("domain", f"{name}.internal"))
    os_ = parse_enum(cluster.get("os", OS.DEBIAN_12.value), OS)
    timezone = parse_timezone(cluster.get("timezone", "UTC"))

    access = Section(doc.require("access"), ("ssh_authorized_keys",))
    keys = tuple(parse_ssh_key(v) for v in access.require("ssh_authorized_keys").items())
    if not keys:
        access.field("ssh_authorized_keys").fail("at least one SSH public key is needed",
                                                 hint="without one nobody can log in to the nodes")

    services_section = doc.section("services", SERVICE_KEYS)
    services = _load_services(services_section, path)
    network_section = Section(doc.require("network"),
                              ("subnet", "gateway", "dns", "vip", "overlay", "boot_server"))
    nodes_value = doc.require("nodes")
    raw_nodes = [_RawNode.parse(v) for v in nodes_value.items()]
    if not raw_nodes:
        nodes_value.at.fail("the cluster needs at least one node")

    network = _load_network(network_section, raw_nodes)
    nodes = _resolve_nodes(raw_nodes, network)
    result = Cluster(name=name, domain=domain, os=os_, timezone=timezone, network=network,
                     ssh_authorized_keys=keys, services=services, nodes=nodes, source=path)
    _check_services(result, services_section)
    return result


SERVICE_KEYS = ("etcd", "ceph", "wireguard", "slurm", "k3s", "k3s_bundle")


def _load_services(section: Section, path: Path) -> Services:
    flags = {key: section.get(key, default).expect(bool)
             for key, default in (("etcd", True), ("ceph", True), ("wireguard", True),
                                  ("slurm", True), ("k3s", False))}
    bundle = None
    raw_bundle = section.get("k3s_bundle")
    if raw_bundle.raw is not None:
        bundle = (path.parent / raw_bundle.expect(str)).resolve()
    if flags["k3s"]:
        if bundle is None:
            section.field("k3s").fail("K3s is enabled but services.k3s_bundle is not set",
                                      hint="K3s comes from an air-gap bundle (k3s binary + images "
                                           "tarball): set k3s_bundle to its path")
        if not bundle.exists():
            raw_bundle.at.fail(f"K3s bundle not found: {bundle}")
    return Services(k3s_bundle=bundle, **flags)


@dataclass(frozen=True)
class _RawNode:
    """A node as written, before defaults: kept with its fields' places for errors."""

    at: Field
    mac: str
    mac_at: Field
    roles: tuple[Role, ...]
    name: str | None
    name_at: Field
    ip: IPv4Address | None
    ip_at: Field
    disks: tuple[str, ...]
    disks_at: Field
    boot: BootMode

    @classmethod
    def parse(cls, value: Value) -> _RawNode:
        s = Section(value, ("mac", "roles", "role", "name", "ip", "disks", "boot"))
        if s.has("roles") and s.has("role"):
            s.field("role").fail("give either 'role' or 'roles', not both")
        if s.has("role"):
            roles: tuple[Role, ...] = (parse_enum(s.get("role"), Role),)
        else:
            roles = tuple(parse_enum(v, Role) for v in s.require("roles").items())
        if not roles:
            s.field("roles").fail("a node needs at least one role",
                                  hint="roles are: " + ", ".join(r.value for r in Role))
        if len(set(roles)) != len(roles):
            s.field("roles").fail("a role is listed twice")
        disks = tuple(_parse_disk(v) for v in s.items("disks"))
        return cls(
            at=value.at,
            mac=parse_mac(s.require("mac")),
            mac_at=s.field("mac"),
            roles=roles,
            name=parse_label(s.get("name"), "hostname") if s.has("name") else None,
            name_at=s.field("name"),
            ip=parse_address(s.get("ip")) if s.has("ip") else None,
            ip_at=s.field("ip"),
            disks=disks,
            disks_at=s.field("disks"),
            boot=parse_enum(s.get("boot", BootMode.INSTALL.value), BootMode),
        )


def _parse_disk(value: Value) -> str:
    text = value.expect(str)
    if not re.match(r"^/dev/[A-Za-z0-9/_.:-]+$", text):
        value.at.fail(f"'{text}' is not a device path", hint="for example /dev/vdb or /dev/disk/by-id/...")
    return text


def _load_network(s: Section, nodes: list[_RawNode]) -> Network:
    subnet = parse_network(s.require("subnet"))
    hosts = subnet.num_addresses - 2
    if hosts < 4:
        s.field("subnet").fail(f"{subnet} is too small for a cluster")
    gateway = parse_address(s.get("gateway")) if s.has("gateway") else subnet.network_address + 1
    dns = tuple(parse_address(v) for v in s.items("dns")) or (gateway,)
    vip = parse_address(s.get("vip")) if s.has("vip") else subnet.broadcast_address - 1
    overlay = parse_network(s.get("overlay", "10.99.0.0/24"))

    for key, addr in (("gateway", gateway), ("vip", vip)):
        _check_in_subnet(s.field(key), addr, subnet)
    if vip == gateway:
        s.field("vip").fail(f"the VIP {vip} is the gateway's address")
    if overlay.overlaps(subnet):
        s.field("overlay").fail(f"overlay {overlay} overlaps the subnet {subnet}",
                                hint="the WireGuard mesh needs its own range, e.g. 10.99.0.0/24")
    if overlay.num_addresses < subnet.num_addresses:
        s.field("overlay").fail(f"overlay {overlay} is smaller than the subnet {subnet}",
                                hint="node i gets the same host number in both; use a prefix "
                                     f"of /{subnet.prefixlen} or shorter")

    taken = {gateway, vip} | {n.ip for n in nodes if n.ip}
    if s.has("boot_server"):
        boot_server = parse_address(s.get("boot_server"))
        _check_in_subnet(s.field("boot_server"), boot_server, subnet)
        if boot_server in taken:
            s.field("boot_server").fail(f"{boot_server} is already used by the gateway, VIP or a node")
    else:
        boot_server = next(a for a in subnet.hosts() if a not in taken)
    return Network(subnet=subnet, gateway=gateway, dns=dns, vip=vip, overlay=overlay,
                   boot_server=boot_server)


def _check_in_subnet(at: Field, addr: IPv4Address, subnet: IPv4Network) -> None:
    if addr not in subnet:
        at.fail(f"{addr} is outside the subnet {subnet}")
    if addr in (subnet.network_address, subnet.broadcast_address):
        at.fail(f"{addr} is the subnet's {'network' if addr == subnet.network_address else 'broadcast'} address")


def _resolve_nodes(raw: list[_RawNode], network: Network) -> tuple[Node, ...]:
    subnet = network.subnet
    seen_macs: dict[str, Field] = {}
    seen_names: dict[str, Field] = {}
    seen_ips: dict[IPv4Address, Field] = {}
    for node in raw:
        if node.mac in seen_macs:
            node.mac_at.fail(f"MAC {node.mac} is used twice (first at line {seen_macs[node.mac].line})")
        seen_macs[node.mac] = node.mac_at
        if node.name is not None:
            if node.name in seen_names:
                node.name_at.fail(f"name '{node.name}' is used twice "
                                  f"(first at line {seen_names[node.name].line})")
            seen_names[node.name] = node.name_at
        if node.ip is not None:
            _check_in_subnet(node.ip_at, node.ip, subnet)
            for what, addr in (("gateway", network.gateway), ("VIP", network.vip)):
                if node.ip == addr:
                    node.ip_at.fail(f"{node.ip} is the {what}'s address")
            if node.ip in seen_ips:
                node.ip_at.fail(f"address {node.ip} is used twice (first at line {seen_ips[node.ip].line})")
            seen_ips[node.ip] = node.ip_at
        if node.disks and Role.STORAGE not in node.roles:
            node.disks_at.fail("only storage nodes hold Ceph data disks",
                               hint="add 'storage' to the node's roles, or remove its disks")

    names = set(seen_names)
    used_ips = set(seen_ips) | {network.gateway, network.vip, network.boot_server}
    counters: dict[str, int] = {}
    resolved = []
    for node in raw:
        plan = plan_for(node.roles)
        name = node.name
        if name is None:
            n = counters.get(plan.prefix, 1)
            while f"{plan.prefix}{n}" in names:
                n += 1
            name = f"{plan.prefix}{n}"
            counters[plan.prefix] = n + 1
            names.add(name)
        ip = node.ip
        if ip is None:
            ip = _first_free(subnet, plan, used_ips)
            if ip is None:
                node.at.fail(
                    f"no free address left for a '{plan.prefix}' node: host numbers "
                    f".{plan.first_host}-.{plan.last_host} of {subnet} are all taken or outside it",
                    hint="give this node an explicit 'ip'")
            used_ips.add(ip)
        host_number = int(ip) - int(subnet.network_address)
        overlay_ip = network.overlay.network_address + host_number
        resolved.append(Node(name=name, mac=node.mac, roles=node.roles, ip=ip,
                             overlay_ip=overlay_ip, disks=node.disks, boot=node.boot))
    return tuple(resolved)


def _first_free(subnet: IPv4Network, plan: NamePlan, used: set[IPv4Address]) -> IPv4Address | None:
    for host in range(plan.first_host, plan.last_host + 1):
        addr = subnet.network_address + host
        if addr not in subnet or addr == subnet.broadcast_address:
            return None
        if addr not in used:
            return addr
    return None


def _check_services(cluster: Cluster, services: Section) -> None:
    core = cluster.with_role(Role.CORE)
    s = cluster.services
    if s.etcd and (not core or len(core) % 2 == 0):
        services.field("etcd").fail(
            f"etcd needs an odd number of core nodes, the inventory has {len(core)}",
            hint="etcd keeps quorum with a majority: use 1, 3 or 5 core nodes")
    if s.ceph and not any(n.disks for n in cluster.with_role(Role.STORAGE)):
        services.field("ceph").fail(
            "Ceph is enabled but no storage node lists a data disk",
            hint="add 'disks: [/dev/vdb]' to a storage node, or set services.ceph: false")
    if s.slurm and not cluster.with_role(Role.COMPUTE):
        services.field("slurm").fail("SLURM is enabled but no node has the compute role",
                                     hint="add 'compute' to a node's roles, or set services.slurm: false")
    if s.k3s and not core:
        services.field("k3s").fail("K3s servers run on core nodes; the inventory has none")

