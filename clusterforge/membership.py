"""Nodes leave, and new hardware takes a dead node's place, with nothing lost.

    ./forge cluster.remove NODE [--inventory PATH]             after deleting NODE from the inventory
    ./forge cluster.replace NODE --mac NEW_MAC [--inventory PATH]

Both run on the factory host, which holds the CA key (it revokes certificates), and reach the
cluster over SSH with clusterforge's key, as cluster.publish does: the cluster's own clients on
a core node (ceph, scontrol, etcdctl) do the work; what to refuse is decided by pure functions
of what they answer (CephView, removal_refusal).

remove, for a non-core node (core membership changes only by replacement): refuse when the
other storage hosts cannot hold every pool's copies; drain it in SLURM and wait for its jobs;
take its OSDs out and wait until Ceph says they are safe to destroy (every placement group
clean elsewhere); stop the node's services (agent/leave.py, when it answers); purge its OSDs
and delete it from SLURM; release its records in etcd; revoke its certificate and release its
name in state/; publish the inventory without it (the core nodes' seeds, the CRL, its PXE
files gone). Every step is idempotent: interrupted, the command is run again.

replace, for a node whose machine is gone (it must not answer): remove its etcd member and
monitor, purge its OSDs (refused while a placement group is not active: they might hold its
last copy), release its records, revoke the old machine's certificate, give its name and
address to the new MAC (new keys), put the new MAC in the inventory file, and publish. The new
machine then network-boots from the cluster, installs, and its agent takes the node's place:
etcd member, monitor, OSDs created and backfilled.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import identity, revocation
from . import inventory as inventory_mod
from . import publish as publish_mod
from . import secrets as secrets_mod
from .fsutil import write_atomic
from .inventory import Cluster, Role, Service
from .log import die, info
from .node.agent import etcd as etcd_agent
from .node.agent.etcd import CRL_KEY
from .node.agent.pxe import INSTALLED
from .node.agent.record import HEALTH_PREFIX
from .node.agent.wireguard import NODES_PREFIX
from .node.seed import ClusterSeed, SeedNode
from .paths import Paths
from .run import CommandError
from .ssh import Target

POLL = 5.0  # seconds between looks at what the cluster is doing
STALLED = 900.0  # seconds without progress before a wait gives up (the command can be run again)
LEAVE_COMMAND = "python3 -m clusterforge.node.agent.leave"
DRAIN_REASON = "cluster.remove"


# ---------------------------------------------------------------- what Ceph says (pure)


@dataclass(frozen=True)
class Osd:
    id: int
    host: str
    up: bool
    inside: bool  # "in": it holds data


@dataclass(frozen=True)
class Pool:
    name: str
    size: int
    domain: str  # where copies go apart: "host" or "osd"


@dataclass(frozen=True)
class CephView:
    osds: tuple[Osd, ...]
    pools: tuple[Pool, ...]

    @classmethod
    def parse(cls, tree: dict[str, Any], pools: list[dict[str, Any]], rules: list[dict[str, Any]]) -> CephView:
        """From `ceph osd tree`, `ceph osd pool ls detail` and `ceph osd crush rule dump` (JSON)."""
        nodes = {n["id"]: n for n in tree.get("nodes", [])}
        osds = []
        for host in (n for n in nodes.values() if n.get("type") == "host"):
            for child in host.get("children", []):
                osd = nodes.get(child, {})
                if osd.get("type") == "osd":
                    osds.append(Osd(int(osd["id"]), host["name"], osd.get("status") == "up",
                                    float(osd.get("reweight", 0)) > 0))
        domains = {}
        for rule in rules:
            steps = [s for s in rule.get("steps", []) if str(s.get("op", "")).startswith("choose")]
            domains[rule.get("rule_id")] = str(steps[-1].get("type", "host")) if steps else "host"
        return cls(tuple(sorted(osds, key=lambda o: o.id)),
                   tuple(Pool(p["pool_name"], int(p["size"]), domains.get(p.get("crush_rule"), "host"))
                         for p in pools))

    def on(self, host: str) -> list[int]:
        return [o.id for o in self.osds if o.host == host]


def removal_refusal(view: CephView, host: str) -> str | None:
    """Why taking `host`'s OSDs out would lose data or leave placement groups that can never
    be clean again; None when the others can hold every copy."""
    if not view.on(host):
        return None
    for pool in view.pools:
        others = [o for o in view.osds if o.host != host and o.up and o.inside]
        left = len({o.host for o in others}) if pool.domain == "host" else len(others)
        what = "storage host" if pool.domain == "host" else "OSD"
        if left == 0:
            return f"{host} holds the last copy of pool {pool.name}'s data: no other {what} is up"
        if left < pool.size:
            return (f"without {host}, pool {pool.name} keeps {pool.size} copies on {left} {what}s: its placement "
                    f"groups could never be clean again; add a storage node first")
    return None


# ---------------------------------------------------------------- reaching the cluster


@dataclass
class Session:
    """The cluster as one command sees it: the inventory, a core node that answers, and the
    running cluster as that node holds it (the last published inventory)."""

    cluster: Cluster
    paths: Paths
    core: Target
    core_name: str
    running: ClusterSeed

    @classmethod
    def open(cls, cluster: Cluster, paths: Paths, skip: str = "") -> Session:
        tried = []
        nodes = [n for n in cluster.with_role(Role.CORE) if n.name != skip]
        for node, target in publish_mod.targets(cluster, paths, nodes):
            try:
                answer = target.run(publish_mod.STATE_COMMAND, timeout=60)
            except CommandError as exc:
                tried.append(f"{node.name}: {str(exc).splitlines()[-1][:120]}")
                continue
            return cls(cluster, paths, target, node.name, publish_mod.Remote.parse(node.name, answer.stdout).running())
        die(f"no core node of cluster {cluster.name} answers over SSH:\n  " + "\n  ".join(tried),
            hint="is the cluster running? (./forge cluster.status for a QEMU cluster)")

    def sh(self, command: str, check: bool = True, timeout: float = 120) -> str:
        return self.core.run(command, check=check, timeout=timeout).stdout

    def json(self, command: str) -> Any:
        return json.loads(self.sh(command) or "null")

    def node_target(self, node: SeedNode) -> Target:
        return publish_mod.targets(self.cluster, self.paths, [node])[0][1]

    def answers(self, node: SeedNode) -> bool:
        try:
            self.node_target(node).run("true", timeout=20)
            return True
        except CommandError:
            return False

    def ceph(self) -> CephView:
        return CephView.parse(self.json("ceph osd tree -f json"), self.json("ceph osd pool ls detail -f json"),
                              self.json("ceph osd crush rule dump -f json"))


def wait(what: str, check: Callable[[], tuple[bool, str]]) -> None:
    """Until check() says done; its second value says what is pending, and a wait whose
    answer does not change for STALLED seconds gives up with it."""
    last, since = "", time.monotonic()
    while True:
        done, pending = check()
        if done:
            return
        if pending != last:
            info(f"  {what}: {pending}")
            last, since = pending, time.monotonic()
        elif time.monotonic() - since > STALLED:
            die(f"{what}: no progress in {STALLED / 60:.0f} minutes: {pending}",
                hint="nothing was lost; see what holds it up (ceph -s, squeue), then run the command again")
        time.sleep(POLL)


# ---------------------------------------------------------------- cluster.remove


def remove(cluster: Cluster, name: str, paths: Paths) -> list[str]:
    """Take a non-core node out of the running cluster; the lines to print."""
    listed = next((n for n in cluster.nodes if n.name == name), None)
    if listed is not None:
        die(f"{name} is still in {cluster.source}", hint=f"delete its entry ({listed.mac}) from the inventory first: "
            "the inventory says what the cluster is to be; cluster.remove takes the node out safely")
    session = Session.open(cluster, paths)
    node = next((n for n in session.running.nodes if n.name == name), None)
    if node is None:
        return release_record(cluster, paths, name)
    if node.has(Role.CORE):
        die(f"{name} is a core node: etcd's members and Ceph's monitors change only by replacement",
            hint=f"if its machine is gone: ./forge cluster.replace {name} --mac NEW_MAC")
    services = session.running.services
    ceph = services.get(Service.CEPH, False) and node.has(Role.STORAGE)
    if ceph:
        refusal = removal_refusal(session.ceph(), name)
        if refusal:
            die(f"{name} cannot leave: {refusal}", hint="nothing was changed")
    done = []
    if services.get(Service.SLURM, False) and node.has(Role.COMPUTE):
        done += drain(session, name)
    if ceph:
        done += move_data_off(session, name)
    if session.answers(node):
        out = session.node_target(node).run(f"{LEAVE_COMMAND} removed from cluster {cluster.name} by cluster.remove",
                                            timeout=300).stdout.strip()
        done.append(f"{name}: {out}")
    else:
        done.append(f"{name} does not answer: nothing to stop on it")
    if ceph:
        done += purge_osds(session, name)
    if services.get(Service.SLURM, False) and node.has(Role.COMPUTE):
        if session.sh(f"sinfo -h -N -n {name} -o %T", check=False).strip():
            session.sh(f"scontrol delete NodeName={name}")
        done.append(f"SLURM: {name} deleted")
    release_etcd(session, node)
    done.append(f"etcd: {name}'s records released")
    done += retire(cluster, paths, name, node.mac, "cluster.remove")
    published = publish_mod.publish(cluster, paths, removing=frozenset({name}))
    done += [f"published: {line}" for line in published.lines]
    done.append(crl_in_etcd(session, cluster, paths, f"{name}'s certificate"))
    return done + [f"{name} removed from cluster {cluster.name}"]


def drain(session: Session, name: str) -> list[str]:
    known = session.sh(f"sinfo -h -N -n {name} -o %T", check=False).strip()
    if not known:
        return [f"SLURM: {name} is not registered: nothing to drain"]
    session.sh(f"scontrol update NodeName={name} State=DRAIN Reason={DRAIN_REASON}")
    info(f"SLURM: {name} drained; waiting for its jobs to end")

    def jobs() -> tuple[bool, str]:
        running = session.sh(f"squeue -h -w {name} -o %i", check=False).split()
        return not running, f"jobs still on {name}: {', '.join(running)}"

    wait("SLURM", jobs)
    return [f"SLURM: {name} drained, no job left on it"]


def move_data_off(session: Session, name: str) -> list[str]:
    ids = session.ceph().on(name)
    if not ids:
        return [f"Ceph: {name} holds no OSD"]
    osds = " ".join(str(i) for i in ids)
    session.sh(f"ceph osd out {osds}")
    info(f"Ceph: osd.{', osd.'.join(map(str, ids))} out; waiting until every placement group is clean elsewhere")

    def safe() -> tuple[bool, str]:
        proc = session.core.run(f"ceph osd safe-to-destroy {osds}", check=False)
        stat = session.sh("ceph pg stat", check=False).strip()
        return proc.returncode == 0, stat or (proc.stdout + proc.stderr).strip()[:200]

    wait("Ceph", safe)
    return [f"Ceph: osd.{', osd.'.join(map(str, ids))} out, every placement group clean on the other OSDs"]


def wait_down(session: Session, ids: list[int], why: str) -> None:
    """Until Ceph marks these OSDs down: only an OSD that is down can be purged."""

    def down() -> tuple[bool, str]:
        up = [o.id for o in session.ceph().osds if o.id in ids and o.up]
        return not up, f"osd.{', osd.'.join(map(str, up))} still up ({why})"

    wait("Ceph", down)


def purge_osds(session: Session, name: str) -> list[str]:
    ids = session.ceph().on(name)
    wait_down(session, ids, f"stopped on {name}: Ceph marks them down")
    for osd in ids:
        session.sh(f"ceph osd purge {osd} --yes-i-really-mean-it")
    session.sh(f"ceph osd crush rm {name}", check=False)  # the empty host bucket
    return [f"Ceph: osd.{', osd.'.join(map(str, ids))} purged"] if ids else []


def release_etcd(session: Session, node: SeedNode) -> None:
    for command in (f"etcdctl del --prefix {NODES_PREFIX}{node.name}/", f"etcdctl del {HEALTH_PREFIX}{node.name}",
                    f"etcdctl del {INSTALLED}{node.mac.replace(':', '-')}"):
        session.sh(command)


def retire(cluster: Cluster, paths: Paths, name: str, mac: str, why: str, successor: str = "") -> list[str]:
    """Revoke the machine's certificate and release its record; with a successor MAC, that MAC
    takes the name and address (and gets keys of its own at the next render)."""
    state = paths.cluster_state(cluster.name)
    with secrets_mod.locked(state):
        records = identity.Records.read(state)
        if mac in records.by_mac and successor:
            records.move(mac, successor)
        elif mac in records.by_mac:
            records.forget(mac)
        secrets_mod.forget_node(state, mac.replace(":", "-"), name, why)
    return [f"{name}: the certificate of {mac} is revoked and its keys deleted (state/{cluster.name})"]


def release_record(cluster: Cluster, paths: Paths, name: str) -> list[str]:
    """A node the running cluster does not know: only what state/ keeps of it goes."""
    records = identity.Records.read(paths.cluster_state(cluster.name))
    mac = next((m for m, r in records.by_mac.items() if r.name == name), None)
    if mac is None:
        die(f"cluster {cluster.name} has no node named {name}",
            hint="its nodes: " + ", ".join(n.name for n in cluster.nodes))
    return [*retire(cluster, paths, name, mac, "cluster.remove"),
            f"{name} never ran in the cluster: its name and address are free again"]


def crl_in_etcd(session: Session, cluster: Cluster, paths: Paths, what: str) -> str:
    """The revocation took effect: etcd holds the new CRL (the core nodes' agents put it there,
    and every node takes it from there) and every core node that answers has given it to its
    etcd member, which reads it for each connection."""
    crl = (paths.cluster_state(cluster.name) / revocation.CRL_FILE).read_text().strip()
    cores = [n for n in session.running.with_role(Role.CORE) if session.answers(n)]
    copy = f"{etcd_agent.TLS_DIR}/crl.pem"

    def everywhere() -> tuple[bool, str]:
        if session.sh(f"etcdctl get --print-value-only {CRL_KEY}", check=False).strip() != crl:
            return False, "the core nodes' agents have not yet put the new CRL in etcd"
        behind = [n.name for n in cores
                  if session.node_target(n).run(f"cat {copy}", check=False, timeout=60).stdout.strip() != crl]
        return not behind, f"the etcd members of {', '.join(behind)} do not have the new CRL yet"

    wait("etcd", everywhere)
    return f"etcd and the agents refuse {what} from now on"


# ---------------------------------------------------------------- cluster.replace


def replace(cluster: Cluster, name: str, new_mac: str, paths: Paths) -> list[str]:
    """Give a dead node's place to a new machine; the lines to print."""
    node = next((n for n in cluster.nodes if n.name == name), None)
    if node is None:
        die(f"no node named {name} in {cluster.source}", hint="nodes: " + ", ".join(n.name for n in cluster.nodes))
    if new_mac == node.mac:
        die(f"{name} already has MAC {new_mac}", hint="--mac is the new machine's MAC")
    other = next((n for n in cluster.nodes if n.mac == new_mac), None)
    if other is not None:
        die(f"{cluster.source} already lists {new_mac}, as {other.name}",
            hint=f"give {name} its old MAC ({identity_mac(cluster, paths, name)}) back in the inventory: "
                 "cluster.replace changes it itself, keeping the node's name and address")
    kept = identity.Records.read(paths.cluster_state(cluster.name)).by_mac.get(new_mac)
    if kept is not None:
        die(f"MAC {new_mac} is {kept.name}'s in state/", hint="a new machine has a MAC of its own")
    mac_place(cluster.source, node.mac)  # the inventory can take the new MAC: checked before anything changes
    session = Session.open(cluster, paths, skip=name)
    running = next((n for n in session.running.nodes if n.name == name), None)
    if running is None or running.mac != node.mac:
        die(f"the cluster does not run {name} on {node.mac}", hint="publish the inventory first: ./forge "
            "cluster.publish (a node that never ran needs no replacing: change its MAC in the inventory)")
    if session.answers(running):
        die(f"{name} still answers at {running.ip}: cluster.replace is for a machine that is gone",
            hint=f"power it off for good first; to take a working node out: ./forge cluster.remove {name}")
    services = session.running.services
    done = []
    if services.get(Service.CEPH, False) and running.has(Role.STORAGE):
        done += purge_dead_osds(session, name)
    if services.get(Service.CEPH, False) and running.has(Role.CORE):
        mons = [m["name"] for m in (session.json("ceph mon dump -f json") or {}).get("mons", [])]
        if name in mons:
            session.sh(f"ceph mon remove {name}")
            done.append(f"Ceph: monitor {name} removed ({len(mons) - 1} left)")
    if services.get(Service.ETCD, False) and running.has(Role.CORE):
        done += remove_member(session, running)
    release_etcd(session, running)
    done += retire(cluster, paths, name, running.mac, f"cluster.replace by {new_mac}", successor=new_mac)
    done.append(set_mac(cluster.source, node.mac, new_mac))
    new = inventory_mod.load(cluster.source, state=paths.state)
    published = publish_mod.publish(new, paths)
    done += [f"published: {line}" for line in published.lines]
    done.append(crl_in_etcd(session, cluster, paths, "the old machine's certificate"))
    return done + [f"{name} is now {new_mac}: power the new machine on with the network first; it installs from "
                   "the cluster and takes its place"]


def purge_dead_osds(session: Session, name: str) -> list[str]:
    ids = session.ceph().on(name)
    if not ids:
        return []
    wait_down(session, ids, "Ceph marks a dead machine's OSDs down")
    stat = session.json("ceph pg stat -f json") or {}
    summary = stat.get("pg_summary", stat)
    total = int(summary.get("num_pgs", 0))
    active = sum(int(s.get("num", 0)) for s in summary.get("num_pg_by_state", [])
                 if "active" in str(s.get("name", "")).split("+"))
    if active < total:
        die(f"{total - active} of {total} placement groups are not active: {name}'s OSDs may hold their last copy",
            hint="bring the other storage nodes up first (ceph -s says which placement groups wait)")
    for osd in ids:
        session.sh(f"ceph osd purge {osd} --yes-i-really-mean-it")
    return [f"Ceph: osd.{', osd.'.join(map(str, ids))} of the dead machine purged (the new one makes its own)"]


def remove_member(session: Session, node: SeedNode) -> list[str]:
    members = session.json("etcdctl member list -w json").get("members", [])
    peer = f"https://{node.ip}:"
    for member in members:
        if member.get("name") == node.name or any(u.startswith(peer) for u in member.get("peerURLs", [])):
            session.sh(f"etcdctl member remove {int(member['ID']):x}")
            return [f"etcd: {node.name}'s member removed ({len(members) - 1} left)"]
    return []


_MAC_TEXT = re.compile(r"[0-9A-Fa-f]{2}(?:[:-][0-9A-Fa-f]{2}){5}|[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}"
                       r"|\b[0-9A-Fa-f]{12}\b")


def mac_place(inventory: Path, mac: str) -> tuple[int, re.Match[str]]:
    """Where the inventory file writes the MAC: one place, or refused (changing nothing)."""
    lines = inventory.read_text().splitlines(keepends=True)
    found = [(i, m) for i, line in enumerate(lines) for m in _MAC_TEXT.finditer(line)
             if re.sub(r"[^0-9a-f]", "", m.group().lower()) == mac.replace(":", "")]
    if len(found) != 1:
        die(f"{inventory}: MAC {mac} is written {len(found)} times; cluster.replace changes it only where it is "
            "written once", hint="write each node's MAC once; nothing was changed")
    return found[0]


def set_mac(inventory: Path, old: str, new: str) -> str:
    """Change the node's MAC in the inventory file, in place and nothing else (comments and
    layout kept)."""
    i, match = mac_place(inventory, old)
    lines = inventory.read_text().splitlines(keepends=True)
    lines[i] = lines[i][:match.start()] + new + lines[i][match.end():]
    write_atomic(inventory, "".join(lines), mode=inventory.stat().st_mode & 0o777)
    return f"{inventory}:{i + 1}: mac {old} -> {new}"


def identity_mac(cluster: Cluster, paths: Paths, name: str) -> str:
    records = identity.Records.read(paths.cluster_state(cluster.name)).by_mac
    return next((mac for mac, r in records.items() if r.name == name), "?")
