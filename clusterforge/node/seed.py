"""The node's seed: what the factory writes and every node reads, declared once.

The factory renders a `ClusterSeed` and an `Identity` into the cloud-init seed
(`/etc/clusterforge/cluster.json`, `identity.json`, beside the node's keys in
`pki/` and `secrets/`); the agent and the installer read them back with
`load()`. Both sides use these classes, so the layout cannot drift.

Standard library only: this module runs on the nodes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2

# Where cloud-init writes the seed on a node, and the files in it.
CONFIG_DIR = Path("/etc/clusterforge")
CLUSTER_JSON = "cluster.json"
IDENTITY_JSON = "identity.json"
PKI_DIR = "pki"  # ca.crt, node.crt, node.key, crl.pem
SECRETS_DIR = "secrets"  # one file per secret, 0600
CA_CERT, NODE_CERT, NODE_KEY = "ca.crt", "node.crt", "node.key"
CRL = "crl.pem"  # the certificates the CA revoked; the agent keeps it current (agent/revoked.py)

# The NoCloud seed's files, as cloud-init reads them from a CD, a directory or a URL.
NOCLOUD_FILES = ("user-data", "meta-data", "network-config")


class Role(StrEnum):
    CORE = "core"
    STORAGE = "storage"
    COMPUTE = "compute"
    FRONTEND = "frontend"


class BootMode(StrEnum):
    INSTALL = "install"
    DISKLESS = "diskless"


class PxeMode(StrEnum):
    """How the formed cluster's core nodes answer network boots (network.pxe)."""

    DHCP = "dhcp"  # full DHCP with static leases: an isolated provisioning network
    PROXY = "proxy"  # proxy-DHCP beside another DHCP server (a router): boot instructions only
    OFF = "off"  # the cluster serves no PXE


class Service(StrEnum):
    """The services an inventory turns on or off, in the order the agent converges them.

    Each has a package set in images/packages/<name>.txt."""

    ETCD = "etcd"
    WIREGUARD = "wireguard"
    CEPH = "ceph"
    SLURM = "slurm"
    K3S = "k3s"


# What a service defaults to when the inventory does not say.
SERVICE_DEFAULTS: dict[Service, bool] = {
    Service.ETCD: True, Service.WIREGUARD: True, Service.CEPH: True, Service.SLURM: True, Service.K3S: False,
}


@dataclass(frozen=True)
class Disk:
    path: str
    wipe: bool = False  # the inventory allows clusterforge to erase what the disk holds

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "wipe": self.wipe}


@dataclass(frozen=True)
class SeedNode:
    name: str
    mac: str
    roles: tuple[Role, ...]
    ip: IPv4Address
    overlay_ip: IPv4Address
    disks: tuple[Disk, ...]
    boot: BootMode
    fqdn: str
    wireguard_public: str = ""  # base64; "" when WireGuard is off

    def has(self, role: Role) -> bool:
        return role in self.roles

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "mac": self.mac, "roles": [str(r) for r in self.roles], "ip": str(self.ip),
                "overlay_ip": str(self.overlay_ip), "disks": [d.to_dict() for d in self.disks],
                "boot": str(self.boot), "fqdn": self.fqdn, "wireguard_public": self.wireguard_public}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SeedNode:
        return cls(name=d["name"], mac=d["mac"], roles=tuple(Role(r) for r in d["roles"]),
                   ip=IPv4Address(d["ip"]), overlay_ip=IPv4Address(d["overlay_ip"]),
                   disks=tuple(Disk(x["path"], bool(x.get("wipe", False))) for x in d["disks"]),
                   boot=BootMode(d["boot"]), fqdn=d["fqdn"], wireguard_public=d.get("wireguard_public", ""))


@dataclass(frozen=True)
class SeedNetwork:
    subnet: IPv4Network
    gateway: IPv4Address
    dns: tuple[IPv4Address, ...]
    vip: IPv4Address
    overlay: IPv4Network
    boot_server: IPv4Address
    pxe: PxeMode = PxeMode.DHCP

    def to_dict(self) -> dict[str, Any]:
        return {"subnet": str(self.subnet), "gateway": str(self.gateway), "dns": [str(a) for a in self.dns],
                "vip": str(self.vip), "overlay": str(self.overlay), "boot_server": str(self.boot_server),
                "pxe": str(self.pxe)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SeedNetwork:
        return cls(subnet=IPv4Network(d["subnet"]), gateway=IPv4Address(d["gateway"]),
                   dns=tuple(IPv4Address(a) for a in d["dns"]), vip=IPv4Address(d["vip"]),
                   overlay=IPv4Network(d["overlay"]), boot_server=IPv4Address(d["boot_server"]),
                   pxe=PxeMode(d.get("pxe", PxeMode.DHCP.value)))


@dataclass(frozen=True)
class ClusterSeed:
    """The cluster as one node sees it. Core nodes get every node; the others get the core
    nodes and themselves (a seed stays small however large the cluster; the rest is in etcd)."""

    name: str
    domain: str
    os: str
    timezone: str
    network: SeedNetwork
    services: dict[Service, bool]
    nodes: tuple[SeedNode, ...]
    ceph_fsid: str = ""
    k3s_bundle: bool = False  # a K3s air-gap bundle comes beside the image
    schema: int = field(default=SCHEMA_VERSION)

    def enabled(self, service: Service) -> bool:
        return self.services.get(service, False)

    def node(self, name: str) -> SeedNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def with_role(self, role: Role) -> tuple[SeedNode, ...]:
        return tuple(n for n in self.nodes if n.has(role))

    def to_dict(self) -> dict[str, Any]:
        return {"schema": self.schema, "name": self.name, "domain": self.domain, "os": self.os,
                "timezone": self.timezone, "network": self.network.to_dict(),
                "services": {str(s): self.services.get(s, False) for s in Service},
                "nodes": [n.to_dict() for n in self.nodes], "ceph_fsid": self.ceph_fsid,
                "k3s_bundle": self.k3s_bundle}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClusterSeed:
        if d.get("schema") != SCHEMA_VERSION:
            raise SeedError(f"seed schema {d.get('schema')!r}; this node software reads schema {SCHEMA_VERSION}")
        return cls(name=d["name"], domain=d["domain"], os=d["os"], timezone=d["timezone"],
                   network=SeedNetwork.from_dict(d["network"]),
                   services={Service(k): bool(v) for k, v in d["services"].items()},
                   nodes=tuple(SeedNode.from_dict(n) for n in d["nodes"]), ceph_fsid=d.get("ceph_fsid", ""),
                   k3s_bundle=bool(d.get("k3s_bundle", False)), schema=d["schema"])


@dataclass(frozen=True)
class Identity:
    cluster: str
    node: str

    def to_json(self) -> str:
        return json.dumps({"cluster": self.cluster, "node": self.node}) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Identity:
        return cls(cluster=d["cluster"], node=d["node"])


class SeedError(Exception):
    """The seed is missing or unreadable: the node cannot know who it is."""


@dataclass(frozen=True)
class Seed:
    """A node's whole seed: the cluster, who this node is, and where its key files are."""

    cluster: ClusterSeed
    identity: Identity
    root: Path = CONFIG_DIR

    @property
    def me(self) -> SeedNode:
        return self.cluster.node(self.identity.node)

    def pki(self, name: str) -> Path:
        return self.root / PKI_DIR / name

    def secret(self, name: str) -> Path:
        return self.root / SECRETS_DIR / name


def parse(cluster_json: str | bytes, identity_json: str | bytes, root: Path = CONFIG_DIR) -> Seed:
    try:
        cluster = ClusterSeed.from_dict(json.loads(cluster_json))
        identity = Identity.from_dict(json.loads(identity_json))
    except (ValueError, KeyError, TypeError) as exc:
        raise SeedError(f"the seed in {root} is malformed: {type(exc).__name__}: {exc}") from None
    seed = Seed(cluster, identity, root)
    if not any(n.name == identity.node for n in cluster.nodes):
        raise SeedError(f"the seed in {root} names node {identity.node!r}, which its cluster does not list")
    return seed


def load(root: Path = CONFIG_DIR) -> Seed:
    try:
        return parse((root / CLUSTER_JSON).read_bytes(), (root / IDENTITY_JSON).read_bytes(), root)
    except FileNotFoundError as exc:
        raise SeedError(f"no seed: {exc.filename} is missing (the node was booted without its seed)") from None


# Secret files in <CONFIG_DIR>/secrets/, each on the nodes that need it (render.py decides who).
WIREGUARD_KEY = "wireguard.key"
MUNGE_KEY = "munge.key"
K3S_TOKEN = "k3s-token"
CEPH_MON_KEY = "ceph-mon.key"  # the mon. entity: core nodes
CEPH_ADMIN_KEY = "ceph-admin.key"  # client.admin: core nodes
CEPH_BOOTSTRAP_OSD_KEY = "ceph-bootstrap-osd.key"  # client.bootstrap-osd: storage nodes
CEPH_MGR_KEY = "ceph-mgr.key"  # mgr.<node>: core nodes

# The operator account: the same name and UID on every node, so jobs and files agree.
OPERATOR = "forge"
OPERATOR_UID = 2000

# A node certificate names the node's WireGuard key as a URI: <this prefix><base64 key>.
# The CA vouches for it, so a key learned from etcd is checked, never trusted.
WIREGUARD_SAN = "urn:clusterforge:wireguard:"
