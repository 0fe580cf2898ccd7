"""The checks of `./forge verify`: every service, with its own client, from inside the nodes.

Not the agent's word for it: etcdctl over TLS, `ceph -s` and an RBD write read back on
another node, `wg show` and pings over the overlay, `sinfo` and `srun`, the VIP, the
health API and check-cluster. Each check returns pass, fail or skipped, with its evidence.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..inventory import Node, Role
from ..node.agent import backup
from ..node.agent.context import STATE_DIR
from ..run import CommandError
from ..vm.cluster import ClusterVMs

EVIDENCE = 1500  # characters of a command's output kept in the report
HANDSHAKE_FRESH = 180
BACKUPS = STATE_DIR / backup.FOLDER
RBD_COPY_SECONDS = 300
SETTLE_SECONDS = 300
CEPH_SETTLE_SECONDS = 600  # Ceph re-evaluates slow-heartbeat warnings over minutes
ETCD_COMMAND_TIMEOUT = 20  # seconds etcdctl waits for a member's answer in the etcd check


@dataclass
class Result:
    name: str
    service: str
    status: str  # pass | fail | skipped
    reason: str
    evidence: str = ""
    started: float = 0.0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "service": self.service, "status": self.status, "reason": self.reason,
                "evidence": self.evidence, "at": round(self.started, 1), "seconds": round(self.seconds, 1),
                **self.extra}


class Failed(Exception):
    """A check's verdict: what is wrong, and the output that shows it."""

    def __init__(self, reason: str, evidence: str = ""):
        super().__init__(reason)
        self.reason, self.evidence = reason, evidence


class Skipped(Exception):
    pass


class Probe:
    """Commands on the cluster's nodes, with what they printed kept as evidence."""

    def __init__(self, vms: ClusterVMs):
        self.vms = vms
        self.log: list[str] = []

    def sh(self, node: Node, command: str, timeout: float = 300, check: bool = True) -> str:
        try:
            proc = self.vms.ssh(node).run(command, check=check, timeout=timeout)
        except CommandError as exc:
            self.log.append(f"{node.name}$ {command}\n{exc.output}")
            raise Failed(f"{node.name}: `{command}` failed ({exc.code if exc.code is not None else 'timed out'})",
                         exc.output[-EVIDENCE:]) from None
        self.log.append(f"{node.name}$ {command}\n{proc.stdout}{proc.stderr}")
        return proc.stdout

    def evidence(self) -> str:
        text = "\n".join(self.log)
        return text if len(text) <= EVIDENCE else "...\n" + text[-EVIDENCE:]


Check = Callable[[ClusterVMs, Probe], str]  # returns the reason for a pass; raises Failed or Skipped


def settle(look: Callable[[], str], seconds: float = SETTLE_SECONDS) -> str:
    """look()'s pass, given `seconds` to come: right after formation, or after a failover
    under emulation, a service may still be moving (a controller taking over, a warning
    clearing). What stays wrong is the verdict."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return look()
        except Failed:
            if time.monotonic() > deadline:
                raise
        time.sleep(10)  # the cluster converges at its own pace
CHECKS: list[tuple[str, str, Check]] = []


def check(name: str, service: str, settles: float = 0) -> Callable[[Check], Check]:
    """Register a check; `settles`: seconds it is given to pass (see settle())."""
    def register(fn: Check) -> Check:
        def settled(vms: ClusterVMs, p: Probe) -> str:
            return settle(lambda: fn(vms, p), settles) if settles else fn(vms, p)
        CHECKS.append((name, service, settled))
        return settled
    return register


def core(vms: ClusterVMs) -> list[Node]:
    return list(vms.cluster.with_role(Role.CORE))


def run_all(vms: ClusterVMs, only: set[str] | None = None,
            progress: Callable[[Result], None] = lambda r: None) -> list[Result]:
    results = []
    for name, service, fn in CHECKS:
        if only is not None and service not in only:
            continue
        probe = Probe(vms)
        start = time.time()
        try:
            result = Result(name, service, "pass", fn(vms, probe))
        except Failed as exc:
            result = Result(name, service, "fail", exc.reason, exc.evidence)
        except Skipped as exc:
            result = Result(name, service, "skipped", str(exc))
        result.started, result.seconds = start, time.time() - start
        result.evidence = result.evidence or probe.evidence()
        results.append(result)
        progress(result)
    return results


@check("etcd: every member healthy over TLS", "etcd", settles=SETTLE_SECONDS)
def etcd_health(vms: ClusterVMs, p: Probe) -> str:
    members = core(vms)
    for node in members:
        # A member's health is a quorum read; under emulation a busy cluster takes longer
        # than etcdctl's 5 s to answer one (seen right after formation).
        out = p.sh(node, f"etcdctl endpoint health --cluster --command-timeout={ETCD_COMMAND_TIMEOUT}s 2>&1",
                   check=False)  # it reports on stderr
        healthy = re.findall(r"^https://\S+ is healthy", out, re.MULTILINE)
        if len(healthy) != len(members):
            raise Failed(f"{node.name} sees {len(healthy)} of {len(members)} members healthy", out)
    return f"{len(members)} members healthy, seen from each"


@check("etcd: no plaintext listener", "etcd")
def etcd_plaintext(vms: ClusterVMs, p: Probe) -> str:
    target = core(vms)[0]
    out = p.sh(vms.cluster.nodes[-1], f"curl -s -m 10 http://{target.ip}:2379/health; echo rc=$?", check=False)
    if '"health"' in out:
        raise Failed(f"{target.name}'s etcd answers plain HTTP", out)
    return "plain HTTP to the client port gets no answer"


@check("time: every clock synchronised", "time", settles=SETTLE_SECONDS)
def time_sync(vms: ClusterVMs, p: Probe) -> str:
    for node in vms.cluster.nodes:
        out = p.sh(node, "chronyc -n tracking")
        if "Leap status     : Normal" not in out:
            raise Failed(f"{node.name}'s clock is not synchronised", out)
    return f"{len(vms.cluster.nodes)} nodes synchronised"


@check("wireguard: handshakes and overlay pings", "wireguard", settles=SETTLE_SECONDS)
def mesh(vms: ClusterVMs, p: Probe) -> str:
    if not vms.cluster.services.wireguard:
        raise Skipped("WireGuard is off in the inventory")
    nodes = vms.cluster.nodes
    for node in nodes:
        others = " ".join(str(n.overlay_ip) for n in nodes if n != node)
        if others:
            p.sh(node, f"for a in {others}; do ping -c 2 -W 3 $a >/dev/null || "
                       "{ echo unreachable $a; exit 1; }; done")
        out = p.sh(node, "echo now $(date +%s); wg show wg0 latest-handshakes")
        now = int(out.split()[1])
        stamps = [int(line.split()[1]) for line in out.splitlines()[1:] if line.strip()]
        if len(stamps) != len(nodes) - 1 or any(now - t > HANDSHAKE_FRESH for t in stamps):
            raise Failed(f"{node.name}: a peer has no recent handshake", out)
    return f"{len(nodes)} nodes, every pair answers over the overlay"


def vip_holders(vms: ClusterVMs, p: Probe, among: list[Node] | None = None, check: bool = True) -> list[str]:
    """The core nodes (or those among) holding the VIP; check=False counts one that cannot be
    asked (a node a fault took down) as not holding it."""
    vip = str(vms.cluster.network.vip)
    return [n.name for n in (core(vms) if among is None else among)
            if f" {vip}/" in p.sh(n, "ip -4 -o addr show", check=check)]


@check("vip: on exactly one core node, answering", "vip", settles=SETTLE_SECONDS)
def vip(vms: ClusterVMs, p: Probe) -> str:
    holders = vip_holders(vms, p)
    if len(holders) != 1:
        raise Failed(f"the VIP is held by {len(holders)} nodes ({', '.join(holders) or 'none'})")
    out = p.sh(vms.cluster.nodes[-1], f"curl -sf -m 10 http://{vms.cluster.network.vip}/api/health")
    # The holder's record in etcd follows the address by one pass of its agent.
    if json.loads(out).get("vip_holder") != holders[0]:
        raise Failed(f"the VIP is on {holders[0]}; its health API names another holder", out)
    return f"held by {holders[0]}, answering /api/health"


@check("health: check-cluster, /api/health and /status on every node", "health", settles=SETTLE_SECONDS)
def health_api(vms: ClusterVMs, p: Probe) -> str:
    for node in vms.cluster.nodes:
        proc = vms.ssh(node).run("check-cluster", check=False, timeout=120)
        p.log.append(f"{node.name}$ check-cluster\n{proc.stdout}")
        if proc.returncode != 0:
            raise Failed(f"check-cluster on {node.name} says the cluster is unhealthy", proc.stdout)
        record = json.loads(p.sh(vms.cluster.nodes[0], f"curl -sf -m 10 http://{node.ip}/api/health"))
        if record.get("node") != node.name:
            raise Failed(f"{node.ip}/api/health does not describe {node.name}")
    page = p.sh(vms.cluster.nodes[0], f"curl -sf -m 10 http://{vms.cluster.network.vip}/status")
    missing = [n.name for n in vms.cluster.nodes if f"<th>{n.name}<br>" not in page]
    if missing:
        raise Failed(f"/status does not list {', '.join(missing)}")
    return "check-cluster exits 0 everywhere; every node's /api/health answers; /status lists every node"


@check("ceph: HEALTH_OK, every usable disk an OSD up and in", "ceph", settles=CEPH_SETTLE_SECONDS)
def ceph_health(vms: ClusterVMs, p: Probe) -> str:
    """Ceph's own verdict, given minutes to settle: warnings right after formation (slow
    heartbeats while the OSDs peer, a recovery) pass; what stays is reported."""
    if not vms.cluster.services.ceph:
        raise Skipped("Ceph is off in the inventory")
    hosts = sum(1 for n in vms.cluster.with_role(Role.STORAGE) if n.disks)
    status = json.loads(p.sh(core(vms)[0], "ceph -s -f json"))
    health = status["health"]["status"]
    osdmap = status.get("osdmap", {})
    osdmap = osdmap.get("osdmap", osdmap)
    checks = set(status["health"].get("checks", {}))
    if health != "HEALTH_OK" and not (hosts < 3 and checks <= {"POOL_NO_REDUNDANCY"}):
        raise Failed(f"{health}: {', '.join(sorted(checks))}", json.dumps(status["health"], indent=1))
    up, total, inn = osdmap.get("num_up_osds", 0), osdmap.get("num_osds", 0), osdmap.get("num_in_osds", 0)
    if not total or up != total or inn != total:
        raise Failed(f"{up} of {total} OSDs up, {inn} in")
    return f"{health}, {up} OSDs up and in"


# Written three times over (size 3) through emulated disks and network: 64 MiB took 201 s
# of verify's six minutes (run 14); 16 MiB proves the same.
RBD_PROBE_MIB = 16


@check("ceph: an RBD image written on one node reads back on another", "ceph")
def rbd_across(vms: ClusterVMs, p: Probe) -> str:
    if not vms.cluster.services.ceph:
        raise Skipped("Ceph is off in the inventory")
    nodes = core(vms)
    writer, reader = nodes[0], nodes[-1]
    image = f"rbd/verify-{int(time.time())}"
    p.sh(writer, f"rbd create {image} --size 128 && dev=$(rbd map {image}) && "
                 f"dd if=/dev/urandom of=/root/verify.bin bs=1M count={RBD_PROBE_MIB} status=none && "
                 "dd if=/root/verify.bin of=$dev bs=1M oflag=direct status=none && sync && rbd unmap $dev", timeout=900)
    written = p.sh(writer, "sha256sum < /root/verify.bin && rm /root/verify.bin").split()[0]
    read = p.sh(reader, f"dev=$(rbd map {image}) && dd if=$dev bs=1M count={RBD_PROBE_MIB} iflag=direct "
                        "status=none | sha256sum && rbd unmap $dev", timeout=900).split()[0]
    p.sh(writer, f"rbd rm {image}", timeout=300)
    if read != written:
        raise Failed(f"{reader.name} read back other data than {writer.name} wrote")
    return f"{RBD_PROBE_MIB} MiB written on {writer.name}, read back on {reader.name}: same sha256"


@check("slurm: every compute node idle, srun on all, also as the operator", "slurm")
def slurm(vms: ClusterVMs, p: Probe) -> str:
    if not vms.cluster.services.slurm:
        raise Skipped("SLURM is off in the inventory")
    compute = [n.name for n in vms.cluster.with_role(Role.COMPUTE)]
    node = vms.cluster.with_role(Role.COMPUTE)[0]

    def idle() -> str:
        states = dict(line.split() for line in p.sh(node, "sinfo -h -N -o '%N %T'").splitlines() if line.strip())
        if sorted(states) != sorted(compute) or set(states.values()) != {"idle"}:
            raise Failed(f"sinfo: {states}")
        return ""

    settle(idle)
    n = len(compute)
    names = sorted(p.sh(node, f"srun -N{n} hostname", timeout=600).split())
    if names != sorted(compute):
        raise Failed(f"srun -N{n} hostname answered {names}")
    uids = p.sh(node, f"sudo -iu forge srun -N{n} id -u", timeout=600).split()
    if uids != ["2000"] * n:
        raise Failed(f"srun as the operator answered {uids}")
    return f"{n} compute nodes idle; srun -N{n} ran on each, as root and as forge"


@check("backup: an etcd snapshot on every core node, the newest in RBD", "backup")
def backups(vms: ClusterVMs, p: Probe) -> str:
    seen = []
    for node in core(vms):
        newest = p.sh(node, f"ls {BACKUPS}/etcd-{node.name}-*.db | tail -n 1", check=False).strip()
        if not newest:
            raise Failed(f"{node.name} has no etcd snapshot in {BACKUPS}")
        status = p.sh(node, f"etcdctl snapshot status {newest} -w json")
        keys = json.loads(status)["totalKey"]
        seen.append(f"{node.name} ({keys} keys)")
        if vms.cluster.services.ceph:
            image = newest.rsplit("/", 1)[-1].removesuffix(".db")
            deadline = time.monotonic() + RBD_COPY_SECONDS  # copied on the pass after the pool is ready
            while image not in p.sh(node, "rbd ls rbd", check=False).split():
                if time.monotonic() > deadline:
                    raise Failed(f"{node.name}'s newest snapshot {image} is not in the rbd pool")
                time.sleep(10)  # the agent's next pass copies it
    return "snapshots readable on " + ", ".join(seen) + ("; the newest of each in RBD" if vms.cluster.services.ceph
                                                          else "")


@check("k3s: every node Ready", "k3s")
def k3s(vms: ClusterVMs, p: Probe) -> str:
    if not vms.cluster.services.k3s:
        raise Skipped("not verified: no bundle (K3s is off in the inventory; none can be had here)")
    out = p.sh(core(vms)[0], "kubectl get nodes -o json")
    nodes = json.loads(out)["items"]
    ready = [n["metadata"]["name"] for n in nodes
             if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"])]
    if len(ready) != len(nodes) or not nodes:
        raise Failed(f"{len(ready)} of {len(nodes)} K3s nodes Ready", out)
    return f"{len(nodes)} K3s nodes Ready"
