"""Stable node identity: a node (by MAC) keeps the name and address it got first.

The first render of a cluster gives every node its name and address: its pins, or
the defaults of its roles. They are recorded in state/<cluster>/nodes.json and kept
from then on, so reordering the inventory, inserting a node or removing another
renames or renumbers nobody. A pin that equals another node's name or address (kept,
pinned, or the default that node would get) is refused, naming both; changing a
node's own pin renames it (its certificate is reissued). Records of MACs no longer
in the inventory hold their names until `./forge state.forget MAC`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

from .fsutil import write_atomic
from .log import die
from .node.seed import BootMode, Disk, Role
from .yamlsource import Field, Section, Value

RECORDS_FILE = "nodes.json"
NODE_KEYS = ("mac", "roles", "role", "name", "ip", "disks", "boot")
RECORDS_SCHEMA = 1


@dataclass(frozen=True)
class NamePlan:
    """Default names and addresses by role: the name prefix and the range's key."""

    prefix: str
    roles: frozenset[Role]


# Precedence matters for nodes with several roles: core/storage, then frontend, then compute.
PLANS = {
    "core": NamePlan("s", frozenset({Role.CORE, Role.STORAGE})),
    "frontend": NamePlan("f", frozenset({Role.FRONTEND})),
    "compute": NamePlan("c", frozenset({Role.COMPUTE})),
}
# Host numbers in a /24; larger subnets scale them (see default_ranges).
RANGES_24 = {"core": (11, 30), "frontend": (91, 99), "compute": (51, 70)}


def plan_for(roles: Iterable[Role]) -> str:
    for key, plan in PLANS.items():
        if plan.roles & set(roles):
            return key
    raise AssertionError(f"no name plan for roles {roles}")


def default_ranges(subnet: IPv4Network) -> dict[str, tuple[int, int]]:
    """The /24 layout, scaled to larger subnets: in a /16, core nodes get 10.0.11.1 to
    10.0.30.255, compute nodes 10.0.51.1 to 10.0.70.255, as in a /24 with a third octet."""
    scale = max(1, subnet.num_addresses // 256)
    if scale == 1:
        return dict(RANGES_24)
    return {k: (first * scale + 1, (last + 1) * scale - 1) for k, (first, last) in RANGES_24.items()}


@dataclass(frozen=True)
class RawNode:
    """A node as written, before names and addresses are given: with its fields' places."""

    at: Field
    mac: str
    mac_at: Field
    roles: tuple[Role, ...]
    name: str | None
    name_at: Field
    ip: IPv4Address | None
    ip_at: Field
    disks: tuple[Disk, ...]
    boot: BootMode

    @classmethod
    def parse(cls, value: Value, fields: Callable[[Section], dict[str, Any]]) -> RawNode:
        s = Section(value, NODE_KEYS)
        return cls(at=value.at, mac_at=s.field("mac"), name_at=s.field("name"), ip_at=s.field("ip"),
                   **fields(s))

    @property
    def plan(self) -> str:
        return plan_for(self.roles)

    def describe(self) -> str:
        return f"{self.at.path} ({self.mac}, line {self.at.line})"


@dataclass(frozen=True)
class Record:
    name: str
    ip: IPv4Address


@dataclass(frozen=True)
class Records:
    """state/<cluster>/nodes.json: MAC -> the name and address the node was given."""

    path: Path | None
    by_mac: dict[str, Record]

    @classmethod
    def empty(cls) -> Records:
        return cls(None, {})

    @classmethod
    def read(cls, cluster_state: Path) -> Records:
        path = cluster_state / RECORDS_FILE
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return cls(path, {})
        except (OSError, ValueError) as exc:
            die(f"{path}: unreadable ({type(exc).__name__}: {str(exc)[:80]})",
                hint="it records each node's name and address; restore it from a backup of state/, "
                     "or delete it to give every node its default name and address again")
        try:
            if data.get("schema") != RECORDS_SCHEMA:
                raise ValueError(f"schema {data.get('schema')!r}")
            records = {mac: Record(str(r["name"]), IPv4Address(r["ip"])) for mac, r in data["nodes"].items()}
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            die(f"{path}: malformed ({type(exc).__name__}: {str(exc)[:80]})",
                hint="restore it from a backup of state/, or delete it to give every node its default "
                     "name and address again")
        return cls(path, records)

    def without(self, mac: str | None) -> Records:
        """These records as they will be once `mac` is forgotten (in memory only)."""
        return Records(self.path, {m: r for m, r in self.by_mac.items() if m != mac})

    def write(self, nodes: Iterable[Any]) -> Records:
        """Record the nodes' names and addresses, keeping the records of absent MACs."""
        assert self.path is not None
        updated = Records(self.path, {**self.by_mac, **{n.mac: Record(n.name, n.ip) for n in nodes}})
        if updated.by_mac != self.by_mac or not self.path.exists():
            updated._save()
        return updated

    def forget(self, mac: str) -> Records:
        forgotten = self.without(mac)
        forgotten._save()
        return forgotten

    def move(self, mac: str, to: str) -> Records:
        """The name and address of `mac` given to the MAC `to` (new hardware in a node's place)."""
        moved = Records(self.path, {**self.without(mac).by_mac, to: self.by_mac[mac]})
        moved._save()
        return moved

    def _save(self) -> None:
        assert self.path is not None
        body = {"schema": RECORDS_SCHEMA, "nodes": {m: {"name": r.name, "ip": str(r.ip)}
                                                     for m, r in sorted(self.by_mac.items())}}
        write_atomic(self.path, json.dumps(body, indent=2) + "\n", mode=0o600)


# ---------------------------------------------------------------- assignment


@dataclass
class _Slot:
    """One node's value of one field (name or address) while values are given out."""

    node: RawNode
    pin: Any
    kept: Any  # from the records
    value: Any = None


class _Field:
    """Gives one field (name or address) to every node: pins, then kept values, then defaults."""

    def __init__(self, what: str, slots: list[_Slot], fixed: dict[Any, str],
                 default: Callable[[RawNode, set[Any]], Any], orphans: dict[Any, str]):
        self.what, self.slots, self.fixed, self.default, self.orphans = what, slots, fixed, default, orphans

    @property
    def article(self) -> str:
        return f"an {self.what}" if self.what[0] in "aeiou" else f"a {self.what}"

    def given(self, unpinned: _Slot | None = None) -> dict[int, Any]:
        """Every slot's value; with `unpinned`, as if that slot's pin were left out."""
        values: dict[int, Any] = {}
        taken = set(self.fixed) | set(self.orphans)
        for i, slot in enumerate(self.slots):
            if slot is not unpinned and slot.pin is not None:
                values[i] = slot.pin
            elif slot.kept is not None:
                values[i] = slot.kept
        taken |= set(values.values())
        for i, slot in enumerate(self.slots):
            if i not in values:
                values[i] = self.default(slot.node, taken)
                taken.add(values[i])
        return values

    def resolve(self) -> None:
        values = self.given()
        owner: dict[Any, int] = {}
        for i, slot in enumerate(self.slots):
            value = values[i]
            if slot.pin is not None:
                self._check_pin(i, slot)
            if value in owner:  # two kept values: only a hand-edited nodes.json does this
                other = self.slots[owner[value]].node
                slot.node.at.fail(f"{self.what} {value} is recorded for {other.describe()} too",
                                  hint="state/<cluster>/nodes.json was edited by hand; fix or delete it")
            owner[value] = i
            slot.value = value

    def _check_pin(self, index: int, slot: _Slot) -> None:
        at = slot.node.name_at if self.what == "name" else slot.node.ip_at
        pin = f"'{slot.pin}'" if self.what == "name" else slot.pin
        if slot.pin in self.fixed:
            at.fail(f"{pin} is the {self.fixed[slot.pin]}")
        if slot.pin in self.orphans:
            owner = self.orphans[slot.pin]
            at.fail(f"{self.what} {pin} belongs to {owner}, which state/ keeps though it is no longer in the "
                    "inventory", hint=f"if that machine is gone: ./forge state.forget {owner}")
        for other_index, other in enumerate(self.slots):
            if other_index == index:
                continue
            if other.pin == slot.pin:
                at.fail(f"{self.what} {pin} is pinned for {other.node.describe()} too")
            if other.pin is None and other.kept == slot.pin:
                at.fail(f"{self.what} {pin} is {other.node.describe()}'s, kept since the cluster was first "
                        "rendered",
                        hint=f"choose another {self.what}, or first pin that node's {self.what} to something else")
        # The default another node gets when this pin is left out: only nodes without a pin
        # or kept value of their own can take it.
        if any(o.pin is None and o.kept is None for o in self.slots if o is not slot):
            values = self.given(unpinned=slot)
            for other_index, other in enumerate(self.slots):
                if other_index != index and other.pin is None and values[other_index] == slot.pin:
                    at.fail(f"{self.what} {pin} is what {other.node.describe()} gets by default",
                            hint=f"pin {self.article} for that node too, or choose another {self.what}")


def assign(raw: list[RawNode], network: Any, records: Records) -> tuple[Any, ...]:
    """Names and addresses for every node: kept, pinned or defaulted (see the module's doc)."""
    from .inventory import Node

    _check_unique_macs(raw)
    for node in raw:
        if node.ip is not None:
            _check_pin_address(node, network)
    in_inventory = {n.mac for n in raw}
    orphans = {mac: r for mac, r in records.by_mac.items() if mac not in in_inventory}
    kept = {n.mac: records.by_mac.get(n.mac) for n in raw}
    fixed_ips = {network.gateway: "gateway's address", network.vip: "VIP", network.boot_server: "boot server's address"}

    def keep_ip(record: Record | None) -> IPv4Address | None:
        # A recorded address the network no longer lets a node have (outside a changed subnet,
        # now its gateway, VIP or boot server) is given anew; the summary says so.
        return record.ip if record and _usable(record.ip, network) and record.ip not in fixed_ips else None

    names = _Field("name", [_Slot(n, n.name, r.name if (r := kept[n.mac]) else None) for n in raw], {},
                   _default_name, {r.name: mac for mac, r in orphans.items()})
    ips = _Field("address", [_Slot(n, n.ip, keep_ip(kept[n.mac])) for n in raw], fixed_ips,
                 lambda node, taken: _default_ip(node, taken, network),
                 {r.ip: mac for mac, r in orphans.items() if _usable(r.ip, network)})
    names.resolve()
    ips.resolve()
    resolved = []
    for node, name, ip in zip(raw, names.slots, ips.slots, strict=True):
        host = int(ip.value) - int(network.subnet.network_address)
        resolved.append(Node(name=name.value, mac=node.mac, roles=node.roles, ip=ip.value,
                             overlay_ip=network.overlay.network_address + host, disks=node.disks, boot=node.boot))
    return tuple(resolved)


def _check_unique_macs(raw: list[RawNode]) -> None:
    seen: dict[str, Field] = {}
    for node in raw:
        if node.mac in seen:
            node.mac_at.fail(f"MAC {node.mac} is used twice (first at line {seen[node.mac].line})")
        seen[node.mac] = node.mac_at


def _usable(addr: IPv4Address, network: Any) -> bool:
    subnet = network.subnet
    return addr in subnet and addr not in (subnet.network_address, subnet.broadcast_address)


def _check_pin_address(node: RawNode, network: Any) -> None:
    assert node.ip is not None
    subnet = network.subnet
    if node.ip not in subnet:
        node.ip_at.fail(f"{node.ip} is outside the subnet {subnet}")
    if node.ip in (subnet.network_address, subnet.broadcast_address):
        node.ip_at.fail(f"{node.ip} is the subnet's {'network' if node.ip == subnet.network_address else 'broadcast'} "
                        "address")


def _default_name(node: RawNode, taken: set[Any]) -> str:
    prefix = PLANS[node.plan].prefix
    n = 1
    while f"{prefix}{n}" in taken:
        n += 1
    return f"{prefix}{n}"


def _default_ip(node: RawNode, taken: set[Any], network: Any) -> IPv4Address:
    first, last = network.ranges[node.plan]
    base = network.subnet.network_address
    for host in range(first, min(last, network.subnet.num_addresses - 2) + 1):
        addr = base + host
        if addr not in taken:
            return addr
    node.at.fail(f"no free address left for a '{node.plan}' node: host numbers {first}-{last} of "
                 f"{network.subnet} are all taken", hint="give this node an explicit 'ip', or widen "
                                                        f"network.ranges.{node.plan}")


@dataclass(frozen=True)
class Changes:
    """What a render changes in the records: for the summary."""

    new: tuple[str, ...]  # node names
    moved: tuple[str, ...]  # "s1: 10.0.0.11 -> 10.0.0.21"
    orphans: tuple[str, ...]  # "52:54:00:00:00:99 (s4, 10.0.0.14)"


def changes(nodes: Iterable[Any], records: Records) -> Changes:
    new, moved = [], []
    macs = set()
    for n in nodes:
        macs.add(n.mac)
        old = records.by_mac.get(n.mac)
        if old is None:
            new.append(n.name)
            continue
        if old.name != n.name:
            moved.append(f"{old.name} renamed {n.name}")
        if old.ip != n.ip:
            moved.append(f"{n.name}: {old.ip} -> {n.ip}")
    orphans = [f"{mac} ({r.name}, {r.ip})" for mac, r in sorted(records.by_mac.items()) if mac not in macs]
    return Changes(tuple(new), tuple(moved), tuple(orphans))
