"""The cluster inventory: one frozen, typed model, loaded and validated once.

Nothing past this module touches raw YAML. Every user error names the file,
line and field (see yamlsource.Field). Names and addresses a node got once are
kept in state/ (identity.py) and never move when the inventory is edited.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import struct
import zoneinfo
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from . import identity, k3sbundle, yamlsource
from .log import shorten
from .node.pxeserve import HTTP_PORT
from .node.seed import SERVICE_DEFAULTS, BootMode, Disk, PxeMode, Role, SeedNetwork, Service
from .yamlsource import Field, Section, Value, did_you_mean

__all__ = ["HTTP_PORT", "BootMode", "Cluster", "Disk", "Network", "Node", "OS", "PxeMode", "Role", "Service",
           "Services", "load"]

RESERVED_NAMES = {"images", "release", "cache", "runs", "netboot", "published"}  # siblings in dist/
MAX_SSH_KEY = 8192  # characters of an authorized_keys line (RSA 16384 is about 2,800)
MAX_FQDN = 253
RESERVED_HOSTNAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", "broadcasthost"}


class OS(StrEnum):
    DEBIAN_12 = "debian-12"
    UBUNTU_2404 = "ubuntu-24.04"


def image_name(os_: OS) -> str:
    """The node image's file names for an OS (dist/images/<name>.qcow2, .raw, ...)."""
    return f"clusterforge-{os_}"


IMAGE_NAME = image_name(OS.DEBIAN_12)  # the image the factory builds from Debian packages


@dataclass(frozen=True)
class Node:
    name: str
    mac: str  # normalised: lower case, colon separated
    roles: tuple[Role, ...]
    ip: IPv4Address
    overlay_ip: IPv4Address
    disks: tuple[Disk, ...]
    boot: BootMode

    def has(self, role: Role) -> bool:
        return role in self.roles

    @property
    def mac_hyphen(self) -> str:
        """The MAC as iPXE's ${mac:hexhyp} spells it: the name of the node's iPXE script."""
        return self.mac.replace(":", "-")


@dataclass(frozen=True)
class Network(SeedNetwork):
    """The network as the seed carries it, and the ranges defaults are given from."""

    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # plan -> host numbers


@dataclass(frozen=True)
class Services:
    enabled: dict[Service, bool]
    k3s_bundle: Path | None = None

    def __getattr__(self, name: str) -> bool:
        # services.etcd, services.ceph, ... read as the flags (templates use them).
        try:
            return self.enabled[Service(name)]
        except ValueError:
            raise AttributeError(name) from None

    def on(self) -> list[Service]:
        return [s for s in Service if self.enabled[s]]


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

    @property
    def image_name(self) -> str:
        return image_name(self.os)


# ---------------------------------------------------------------- parsers

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_MAC_FORMS = (
    re.compile(r"([0-9a-f]{2})([:-])([0-9a-f]{2})\2([0-9a-f]{2})\2([0-9a-f]{2})\2([0-9a-f]{2})\2([0-9a-f]{2})"),
    re.compile(r"([0-9a-f]{4})\.([0-9a-f]{4})\.([0-9a-f]{4})"),
    re.compile(r"([0-9a-f]{12})"),
)
_SSH_KEY = re.compile(r"(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(?:256|384|521)|sk-ssh-ed25519@openssh\.com"
                      r"|sk-ecdsa-sha2-nistp256@openssh\.com) ([A-Za-z0-9+/]+={0,2})(?: (.*))?")
_DISK = re.compile(r"/dev/[A-Za-z0-9_.:+@=,-]+(?:/[A-Za-z0-9_.:+@=,-]+)*")


def parse_mac(value: Value) -> str:
    """Accept aa:bb:.., AA-BB-.., aabb.ccdd.eeff and aabbccddeeff; return aa:bb:cc:dd:ee:ff."""
    text = value.text().strip().lower()
    for form in _MAC_FORMS:
        match = form.fullmatch(text)
        if match:
            digits = "".join(g for g in match.groups() if g not in (":", "-"))
            mac = ":".join(digits[i:i + 2] for i in range(0, 12, 2))
            if int(digits[:2], 16) & 1:
                value.at.fail(f"{shorten(value.raw)} is a multicast address, not a NIC's MAC")
            if int(digits, 16) == 0:
                value.at.fail("00:00:00:00:00:00 is not a NIC's MAC")
            return mac
    value.at.fail(f"{shorten(value.raw)} is not a MAC address",
                  hint="write it as 52:54:00:12:34:56, 52-54-00-12-34-56 or 5254.0012.3456")


def parse_label(value: Value, what: str) -> str:
    text = value.text()
    if not _LABEL.fullmatch(text):
        value.at.fail(f"{shorten(text)} is not a valid {what}",
                      hint="use 1-63 lower-case letters, digits and '-', not starting or ending with '-'")
    return text


def parse_hostname(value: Value) -> str:
    name = parse_label(value, "hostname")
    if name in RESERVED_HOSTNAMES or name.isdigit():
        value.at.fail(f"'{name}' cannot name a node", hint="it means something else to every resolver")
    return name


def parse_domain(value: Value) -> str:
    text = value.text().rstrip(".")
    if len(text) > 253 or not all(_LABEL.fullmatch(p) for p in text.split(".")):
        value.at.fail(f"{shorten(value.raw)} is not a valid DNS domain")
    return text


def parse_address(value: Value) -> IPv4Address:
    text = value.text()
    try:
        return IPv4Address(text)
    except ipaddress.AddressValueError:
        value.at.fail(f"{shorten(text)} is not an IPv4 address")


def parse_network(value: Value) -> IPv4Network:
    text = value.text()
    try:
        net = IPv4Network(text)
    except ValueError as exc:
        value.at.fail(f"{shorten(text)} is not an IPv4 network in CIDR form ({shorten(str(exc), 60)})",
                      hint="for example 10.0.0.0/24")
    for what, bad in (("loopback", net.is_loopback), ("multicast", net.is_multicast),
                      ("link-local", net.is_link_local), ("unspecified", net.network_address.is_unspecified),
                      ("reserved", net.is_reserved)):
        if bad:
            value.at.fail(f"{net} is a {what} network, not one a cluster can use",
                          hint="use a private range such as 10.0.0.0/24 or 192.168.10.0/24")
    return net


def parse_enum(value: Value, enum: type[StrEnum]) -> Any:
    text = value.text()
    try:
        return enum(text)
    except ValueError:
        choices = [e.value for e in enum]
        value.at.fail(f"{shorten(text)} is not one of: {', '.join(choices)}", hint=did_you_mean(text, choices))


def parse_pxe(value: Value) -> PxeMode:
    # YAML 1.1 reads an unquoted `off` as false: that is what the user wrote.
    return PxeMode.OFF if value.raw is False else parse_enum(value, PxeMode)  # type: ignore[no-any-return]


def parse_timezone(value: Value) -> str:
    text = value.text()
    try:
        if not re.fullmatch(r"[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*", text):
            raise ValueError(text)
        zoneinfo.ZoneInfo(text)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        value.at.fail(f"{shorten(text)} is not a known time zone", hint="for example UTC or Europe/Berlin")
    return text


def parse_ssh_key(value: Value) -> str:
    """An OpenSSH public key line whose blob really is a key of the type it names."""
    text = value.text().strip()
    if len(text) > MAX_SSH_KEY:
        value.at.fail(f"{shorten(text)} is too long for an SSH public key (at most {MAX_SSH_KEY} characters)")
    match = _SSH_KEY.fullmatch(text)
    if match:
        kind, blob, comment = match.group(1), match.group(2), match.group(3) or ""
        odd = next((c for c in comment if not " " <= c <= "~"), None)
        if odd is not None:  # authorized_keys and every tool reading it: ASCII
            value.at.fail(f"the comment of {shorten(text)} holds the character {odd!r}",
                          hint="an SSH key's comment takes printable ASCII only")
        try:
            raw = base64.b64decode(blob, validate=True)
            (length,) = struct.unpack(">I", raw[:4])
            if raw[4:4 + length].decode() == kind and len(raw) > 4 + length + 16 and _key_parses(kind, blob):
                return text
        except (binascii.Error, struct.error, UnicodeDecodeError):
            pass
    value.at.fail(f"{shorten(text)} is not an SSH public key",
                  hint="paste a whole line of ~/.ssh/id_ed25519.pub (type, key, optional comment)")


def _key_parses(kind: str, blob: str) -> bool:
    """The key material itself is sound (cryptography reads every type but the sk- ones)."""
    if kind.startswith("sk-"):
        return True
    try:
        serialization.load_ssh_public_key(f"{kind} {blob}".encode())
        return True
    except (ValueError, UnsupportedAlgorithm):
        return False


def parse_disk(value: Value, storage: bool) -> Disk:
    """A data disk: '/dev/vdb' or {path: /dev/disk/by-id/..., wipe: true}."""
    if isinstance(value.raw, dict):
        s = Section(value, ("path", "wipe"))
        path_value, wipe = s.require("path"), s.get("wipe", False).expect(bool)
    else:
        path_value, wipe = value, False
    text = path_value.text()
    parts = text.split("/")
    if not _DISK.fullmatch(text) or any(p in (".", "..") for p in parts) or len(text) > 255:
        path_value.at.fail(f"{shorten(text)} is not a device path",
                           hint="an absolute path under /dev: /dev/vdb, /dev/nvme1n1 or /dev/disk/by-id/...")
    if not storage:
        value.at.fail("only storage nodes hold Ceph data disks",
                      hint="add 'storage' to the node's roles, or remove its disks")
    return Disk(text, wipe)


# ---------------------------------------------------------------- loading

TOP_KEYS = ("cluster", "network", "access", "services", "nodes")
SERVICE_KEYS = (*(str(s) for s in Service), "k3s_bundle")


def load(path: Path | str, state: Path | None = None, forgetting: str | None = None) -> Cluster:
    """Load and validate an inventory. With `state` (the state root), nodes keep the
    names and addresses recorded there when the cluster was rendered before; but for the
    record of `forgetting` (a MAC: state.forget checks the inventory as it will be)."""
    path = Path(path)
    top = Value(yamlsource.load(path), Field(path, 1, ""))
    if top.raw is None:
        top.at.fail("the inventory is empty")
    doc = Section(top, TOP_KEYS)

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
                              ("subnet", "gateway", "dns", "vip", "overlay", "boot_server", "ranges", "pxe"))
    nodes_value = doc.require("nodes")
    raw_nodes = [identity.RawNode.parse(v, _parse_node) for v in nodes_value.items()]
    if not raw_nodes:
        nodes_value.at.fail("the cluster needs at least one node")

    network = _load_network(network_section, raw_nodes)
    records = identity.Records.read(state / name) if state is not None else identity.Records.empty()
    nodes = identity.assign(raw_nodes, network, records.without(forgetting))
    for node, raw in zip(nodes, raw_nodes, strict=True):
        if len(node.name) + 1 + len(domain) > MAX_FQDN:
            raw.name_at.fail(f"the node's FQDN {shorten(node.name + '.' + domain)} is longer than DNS allows "
                             f"({MAX_FQDN} characters)", hint="shorten cluster.domain")
    result = Cluster(name=name, domain=domain, os=os_, timezone=timezone, network=network,
                     ssh_authorized_keys=keys, services=services, nodes=nodes, source=path)
    _check_services(result, services_section)
    return result


def _load_services(section: Section, path: Path) -> Services:
    flags = {s: section.get(str(s), default).expect(bool) for s, default in SERVICE_DEFAULTS.items()}
    bundle = None
    raw_bundle = section.get("k3s_bundle")
    if raw_bundle.raw is not None:
        text = raw_bundle.text()
        if not text.strip():
            raw_bundle.at.fail("is empty", hint="the path of a K3s air-gap bundle, or leave the key out")
        # Relative to the inventory file, wherever the command runs from.
        bundle = Path(os.path.normpath(path.parent.resolve() / text))
        k3sbundle.check(bundle, raw_bundle.at)
    if flags[Service.K3S] and bundle is None:
        section.field("k3s").fail("K3s is enabled but services.k3s_bundle is not set",
                                  hint="K3s comes from an air-gap bundle (k3s binary + images "
                                       "tarball): set k3s_bundle to its path")
    return Services(enabled=flags, k3s_bundle=bundle)


def _parse_node(s: Section) -> dict[str, Any]:
    if s.has("roles") and s.has("role"):
        s.field("role").fail("give either 'role' or 'roles', not both")
    if s.has("role"):
        roles: tuple[Role, ...] = (parse_enum(s.get("role"), Role),)
    else:
        roles = tuple(parse_enum(v, Role) for v in s.require("roles").items())
    if not roles:
        s.field("roles").fail("a node needs at least one role", hint="roles are: " + ", ".join(r.value for r in Role))
    if len(set(roles)) != len(roles):
        s.field("roles").fail("a role is listed twice")
    storage = Role.STORAGE in roles
    disks = tuple(parse_disk(v, storage) for v in s.items("disks"))
    if len({d.path for d in disks}) != len(disks):
        s.field("disks").fail("a disk is listed twice")
    return dict(
        mac=parse_mac(s.require("mac")),
        roles=roles,
        name=parse_hostname(s.get("name")) if s.has("name") else None,
        ip=parse_address(s.get("ip")) if s.has("ip") else None,
        disks=disks,
        boot=parse_enum(s.get("boot", BootMode.INSTALL.value), BootMode),
    )


def _usable_host(at: Field, addr: IPv4Address, what: str) -> None:
    if addr.is_unspecified or addr.is_multicast or addr == IPv4Address("255.255.255.255") or addr.is_reserved:
        at.fail(f"{addr} cannot be {what}")


def _load_network(s: Section, nodes: list[identity.RawNode]) -> Network:
    subnet = parse_network(s.require("subnet"))
    hosts = subnet.num_addresses - 2
    if hosts < 4:
        s.field("subnet").fail(f"{subnet} is too small for a cluster", hint="use a /29 or larger")
    gateway = parse_address(s.get("gateway")) if s.has("gateway") else subnet.network_address + 1
    dns = tuple(parse_address(v) for v in s.items("dns")) or (gateway,)
    for i, (addr, value) in enumerate(zip(dns, s.items("dns"), strict=False)):
        _usable_host(value.at, addr, f"a DNS server (dns[{i}])")
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
        free = next((a for a in subnet.hosts() if a not in taken), None)
        if free is None:
            s.field("subnet").fail(f"{subnet} has no address left for the boot server",
                                   hint="use a larger subnet, or set network.boot_server")
        boot_server = free
    ranges = _load_ranges(s, subnet)
    pxe = parse_pxe(s.get("pxe", PxeMode.DHCP.value))
    return Network(subnet=subnet, gateway=gateway, dns=dns, vip=vip, overlay=overlay,
                   boot_server=boot_server, pxe=pxe, ranges=ranges)


def _load_ranges(s: Section, subnet: IPv4Network) -> dict[str, tuple[int, int]]:
    """Host-number ranges per name plan: the defaults scaled to the subnet, or the inventory's."""
    ranges = identity.default_ranges(subnet)
    section = s.section("ranges", tuple(ranges))
    last_host = subnet.num_addresses - 2
    for plan in ranges:
        if not section.has(plan):
            continue
        value = section.get(plan)
        match = re.fullmatch(r"\s*(\d{1,9})\s*-\s*(\d{1,9})\s*", value.raw if isinstance(value.raw, str) else "")
        if not match:
            value.at.fail(f"expected a range of host numbers such as \"11-30\", got {yamlsource.describe(value.raw)}")
        first, last = int(match.group(1)), int(match.group(2))
        if not 1 <= first <= last <= last_host:
            value.at.fail(f"{first}-{last} is not a range of host numbers inside {subnet} (1-{last_host})")
        ranges[plan] = (first, last)
    ordered = sorted(ranges.items(), key=lambda item: item[1])
    for (a, (_, a_last)), (b, (b_first, _)) in zip(ordered, ordered[1:], strict=False):
        if b_first <= a_last:
            section.at.fail(f"the {a} and {b} ranges overlap")
    return ranges


def _check_in_subnet(at: Field, addr: IPv4Address, subnet: IPv4Network) -> None:
    if addr not in subnet:
        at.fail(f"{addr} is outside the subnet {subnet}")
    if addr in (subnet.network_address, subnet.broadcast_address):
        at.fail(f"{addr} is the subnet's {'network' if addr == subnet.network_address else 'broadcast'} address")


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
    for service in (Service.CEPH, Service.SLURM, Service.K3S):
        if s.enabled[service] and not s.etcd:
            services.field(str(service)).fail(f"{service} needs etcd (the agent keeps its run-time state there)",
                                              hint="set services.etcd: true")
    if s.k3s and not core:
        services.field("k3s").fail("K3s servers run on core nodes; the inventory has none")
