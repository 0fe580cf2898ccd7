"""SLURM's files and commands, declared once for slurm.py (slurmd) and slurmctld.py.

slurm.conf names no compute node: compute nodes register themselves (`slurmd -Z`, dynamic
nodes) with the CPUs and memory they really have, and fetch slurm.conf from the controller
("configless"). So the file is the same on every core node, made from the seed's core
nodes alone, and a compute node needs nothing but the controllers' addresses.
"""

from __future__ import annotations

from pathlib import Path

from ...run import CommandError, run
from ..seed import ClusterSeed, Role

CONF = Path("/etc/slurm/slurm.conf")
STATE_DIR = Path("/var/lib/slurm/slurmctld")  # StateSaveLocation: the controller's state (jobs, nodes)
SPOOL_DIR = Path("/var/lib/slurm/slurmd")  # SlurmdSpoolDir; a configless node's config lands in conf-cache/
SLURM_USER = "slurm"
SLURMD_UNIT = "slurmd.service"
SLURMCTLD_UNIT = "slurmctld.service"
SLURMD_DROPIN = Path("/etc/systemd/system/slurmd.service.d/clusterforge.conf")
SLURMCTLD_DROPIN = Path("/etc/systemd/system/slurmctld.service.d/clusterforge.conf")
FEATURE = "compute"  # every dynamic node carries it: a NodeSet of compute nodes needs no list

# Emulated machines run 10-50x slower than metal; a real failure must still show within a minute.
SLURMCTLD_TIMEOUT = 15  # a backup controller running alone takes control after this (Debian: 120 s)
SLURMD_TIMEOUT = 60  # a silent slurmd is marked DOWN after this (default 300 s)
MESSAGE_TIMEOUT = 20  # one round trip (default 10 s; a stalled VM answers in seconds)
BATCH_START_TIMEOUT = 60  # launching a batch job (default 10 s)
STOP_TIMEOUT = 10  # a controller that lost its role is killed if saving its state takes longer
MIN_NODE_COUNT = 64
COMMAND_TIMEOUT = 15.0  # sinfo/scontrol: a client retries the controllers for up to MessageTimeout


def controllers(cluster: ClusterSeed) -> list[tuple[str, str]]:
    """(name, LAN address) of every core node, in inventory order: the same list, in the
    same order, in every core node's seed."""
    return [(n.name, str(n.ip)) for n in cluster.with_role(Role.CORE)]


def max_node_count(cluster: ClusterSeed) -> int:
    """Dynamic nodes need room in the controller's tables: twice the inventory's compute nodes
    (nodes added to the inventory join before the core nodes get new seeds), at least 64."""
    return max(MIN_NODE_COUNT, 2 * len(cluster.with_role(Role.COMPUTE)))


def slurm_conf(cluster: ClusterSeed) -> str:
    """slurm.conf for a core node's seed (it lists every node). Each core node is a
    SlurmctldHost; only the elected one runs slurmctld (see slurmctld.py)."""
    lines = [
        "# Written by the clusterforge agent from the seed: the same on every core node.",
        "# Compute nodes fetch it from the controller (configless) and register themselves",
        "# with their real CPUs and memory (dynamic nodes): no node is listed here.",
        f"ClusterName={cluster.name.lower()}",
        "# Every core node, in inventory order: clients and slurmd try them in turn and use the",
        "# one that answers; only the core node elected by the agent runs slurmctld.",
        *(f"SlurmctldHost={name}({ip})" for name, ip in controllers(cluster)),
        "SlurmctldParameters=enable_configless",
        "AuthType=auth/munge",
        f"SlurmUser={SLURM_USER}",
        f"StateSaveLocation={STATE_DIR}",
        f"SlurmdSpoolDir={SPOOL_DIR}",
        "SlurmctldPidFile=/run/slurmctld.pid",
        "SlurmdPidFile=/run/slurmd.pid",
        "# Dynamic nodes: room in the tables, no message fan-out through slurmd, cons_tres.",
        f"MaxNodeCount={max_node_count(cluster)}",
        "TreeWidth=65533",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "ProctrackType=proctrack/linuxproc",
        "# A node that comes back (a reboot, a failover) is used again without an operator.",
        "ReturnToService=2",
        "# Tolerant of slow emulated machines; a dead controller or node still shows within a minute.",
        f"SlurmctldTimeout={SLURMCTLD_TIMEOUT}",
        f"SlurmdTimeout={SLURMD_TIMEOUT}",
        f"MessageTimeout={MESSAGE_TIMEOUT}",
        f"BatchStartTimeout={BATCH_START_TIMEOUT}",
        "PartitionName=all Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(lines) + "\n"


def slurmd_dropin(cluster: ClusterSeed) -> str:
    """The slurmd unit's drop-in on a compute node: configless, dynamic."""
    servers = ",".join(ip for _, ip in controllers(cluster))
    return f"""# Written by the clusterforge agent from the seed.
[Unit]
# Debian's unit waits for /etc/slurm/slurm.conf; a configless node fetches it from the controller.
ConditionPathExists=

[Service]
# The core nodes in inventory order: slurmd asks each until the controller answers, and
# registers this node with the CPUs and memory it really has (a dynamic node).
ExecStart=
ExecStart=/usr/sbin/slurmd -D -s --conf-server {servers} -Z --conf "Feature={FEATURE}"
# No controller answers yet (the cluster is forming, or a failover is under way): try again.
Restart=on-failure
RestartSec=5
"""


def slurmctld_dropin(rbd_state: bool) -> str:
    """The slurmctld unit's drop-in on a core node. The agent starts slurmctld on the elected
    core node only, never at boot. With Ceph, the state is an RBD image mounted at
    StateSaveLocation: the unit refuses to start without it (a controller started by hand on
    an empty directory would take over with no jobs)."""
    condition = ("# The state is the RBD image that follows the elected node: never start without it.\n"
                 f"ConditionPathIsMountPoint={STATE_DIR}\n") if rbd_state else ""
    return f"""# Written by the clusterforge agent. slurmctld runs on the core node holding the
# slurmctld election only: the agent starts it there once the state is in place, and stops
# it the moment the node loses the role.
[Unit]
RequiresMountsFor={STATE_DIR}
{condition}
[Service]
# Stop at once; if saving the state hangs (a fenced RBD image), kill.
TimeoutStopSec={STOP_TIMEOUT}
"""


# ---------------------------------------------------------------- what slurm says


def query_nodes() -> tuple[dict[str, str] | None, str]:
    """Node -> state as the controller sees it (`sinfo -N`), or None and why."""
    try:
        out = run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=COMMAND_TIMEOUT).stdout
    except CommandError as exc:
        return None, last_line(exc)
    return parse_nodes(out), ""


def parse_nodes(out: str) -> dict[str, str]:
    nodes: dict[str, str] = {}
    for line in out.splitlines():
        name, _, state = line.strip().partition(" ")
        if name and state:
            nodes[name] = state.strip().lower()
    return nodes


def query_controller() -> tuple[str, str]:
    """The controller that answers (`scontrol ping`), or "" and why."""
    try:
        out = run(["scontrol", "ping"], check=False, timeout=COMMAND_TIMEOUT).stdout
    except CommandError as exc:
        return "", last_line(exc)
    up = parse_ping(out)
    return (up, "") if up else ("", "no controller answers")


def parse_ping(out: str) -> str:
    """ "Slurmctld(backup1) at s2 is UP" -> "s2" (only the elected node runs slurmctld)."""
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 5 and words[0].startswith("Slurmctld(") and words[-1] == "UP":
            return words[2]
    return ""


def judge(state: str) -> str:
    """A node's sinfo state -> "ok", "drained", "down" or "silent" (not responding)."""
    if state.endswith("*"):
        return "silent"
    base = state.rstrip("$~#!%@^-").split("+")[0]
    if base.startswith("drain"):
        return "drained"
    if base in ("down", "fail", "failing", "unknown", "future", "inval"):
        return "down"
    return "ok"  # idle, mixed, allocated, completing, planned, reserved


def summary(nodes: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for state in nodes.values():
        counts[state] = counts.get(state, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "none registered"


def last_line(exc: Exception) -> str:
    lines = [x.strip() for x in str(exc).strip().splitlines() if x.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]
