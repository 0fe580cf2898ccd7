"""`./forge verify --faults`: once the cluster is healthy, break it four ways, in order, and
time how long it takes to be fully healthy again with no action:

1. hard power-off of one core node (the SLURM controller's): etcd keeps quorum, the VIP is
   on one live core node, SLURM runs a job, Ceph serves reads and writes (degraded allowed);
   then the node is started again;
2. one node cut off (link down): no split brain (one VIP holder, one slurmctld, etcd writes
   refused on the cut-off node, looked at through the guest agent); then healed;
3. every node paused for 60 s and resumed (a clock jump);
4. every node power-cycled at once: the cluster reassembles.

A fault's recovery is timed from the moment it is undone (the node started again, the link up,
the nodes resumed or powered on) to fully healthy; one that does not come within its limit
fails, naming what is still unhealthy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from ..inventory import Node, Role
from ..node.agent.slurmconf import parse_ping
from ..vm.cluster import ClusterVMs
from .checks import ETCD_COMMAND_TIMEOUT, Failed, Probe, Result, core, vip_holders
from .run import cluster_view, formation_timeout, last_passes, wait_formed

RECOVERY_LIMIT = 900.0  # seconds to fully healthy once a fault is undone, under TCG (a power-cycle: a formation's)
PAUSE_SECONDS = 60
GO_FILE = "/root/fault-job.go"  # fault 1's job runs until this file is on its node
JOB_MINUTES = 30  # and ends by itself after this, should the fault fail first
STATE_FILE = "/var/lib/slurm/slurmctld/job_state"  # the controller's saved jobs
STEP = 5.0
T = TypeVar("T")


def until(what: str, probe: Callable[[], T | None], seconds: float = 300, every: float = STEP) -> T:
    """probe()'s first true answer; Failed with its last answer when none comes within seconds."""
    deadline = time.monotonic() + seconds
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)  # the cluster reacts at its own pace: look again
    raise Failed(f"{what}: not within {seconds:.0f}s", str(last)[-1500:])


def controller(vms: ClusterVMs, p: Probe, asked: Node) -> str:
    return p.sh(asked, "etcdctl get /clusterforge/leader/slurmctld --print-value-only", check=False).strip()


def recover(vms: ClusterVMs, since: float, limit: float = RECOVERY_LIMIT) -> float:
    """Seconds from since (the fault undone, time.monotonic()) to fully healthy, as every node's
    agent sees it in a pass made after now; Failed past limit."""
    after = last_passes(cluster_view(vms))
    took, view = wait_formed(vms, since, timeout=max(1.0, since + limit - time.monotonic()), after=after)
    if took is None:
        raise Failed(f"not fully healthy within {limit:.0f}s: " + "; ".join(view.get("problems", [])[:5]))
    return took


def settled_controller(vms: ClusterVMs, p: Probe, nodes: list[Node]) -> str:
    """The node whose slurmctld answers (a test before may have moved the role): "" without SLURM."""
    if not vms.cluster.services.slurm:
        return ""

    def answering() -> str:
        name = controller(vms, p, nodes[0])
        return name if name and parse_ping(p.sh(nodes[0], "scontrol ping", check=False)) == name else ""
    return until("a SLURM controller elected and answering", answering, seconds=600)


FINAL_JOB_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                    "OUT_OF_MEMORY", "PREEMPTED"}


def field(record: str, name: str) -> str:
    """ "JobId=3 ... JobState=COMPLETED BatchHost=s1 ..." -> its name=value's value; "" when not there."""
    return next((word.removeprefix(f"{name}=") for word in record.split() if word.startswith(f"{name}=")), "")


def job_state(record: str) -> str:
    return field(record, "JobState")


def running(p: Probe, asker: Node, job: str) -> str:
    """The job's record while the controller in control has it running; "" otherwise."""
    record = p.sh(asker, f"scontrol -o show job {job}", check=False).strip()
    return record if job_state(record) == "RUNNING" else ""


def job_ended(p: Probe, asker: Node, job: str, seconds: float) -> str:
    """The job's record once it ended (kept by the controller MinJobAge, 300 s, after that); Failed
    with its last record when it has not within seconds."""
    seen = [""]

    def ended() -> str:
        seen[0] = p.sh(asker, f"scontrol -o show job {job}", check=False).strip()
        return seen[0] if job_state(seen[0]) in FINAL_JOB_STATES else ""
    try:
        return until(f"job {job} ended", ended, seconds=seconds)
    except Failed as exc:
        raise Failed(exc.reason, seen[0]) from None


def power_off(vms: ClusterVMs, p: Probe) -> tuple[Node, float, float]:
    """The SLURM controller's node powered off and what must go on without it checked: the node,
    the seconds until another controller answered, and when the power went (time.monotonic()).
    Should a check fail, the node is started again before the failure is raised."""
    nodes = core(vms)
    victim_name = settled_controller(vms, p, nodes) or nodes[0].name
    victim = vms.cluster.node(victim_name)
    live = [n for n in nodes if n != victim]
    asker = live[0]
    job = ""
    if vms.cluster.services.slurm:
        # A job on a node that stays up, running until it is told to end (GO_FILE on its node;
        # within JOB_MINUTES should the fault fail first), and in the state the controller saved
        # (on the RBD image) before the power goes.
        job = p.sh(asker, f"sbatch --parsable -N1 --exclude={victim.name} --time={JOB_MINUTES} "
                          f"-o /root/fault-job.out --wrap 'while [ ! -e {GO_FILE} ]; do sleep 2; done; "
                          f"rm {GO_FILE}; hostname'").strip()
        try:
            until(f"job {job} running", lambda: running(p, asker, job), seconds=300, every=2)
            saved(p, victim, asker, job)
        except BaseException:
            p.sh(asker, f"scancel {job}", check=False)
            raise
    vms.kill(victim.name)
    off = time.monotonic()
    try:
        failover = without(vms, p, victim, live, job) - off
    except BaseException:
        vms.start(victim.name)  # the checks after this one need every node
        if job:
            p.sh(asker, f"scancel {job}", check=False)
        raise
    return victim, failover, off


def saved(p: Probe, controller: Node, asker: Node, job: str) -> None:
    """The running job in the state the controller saved: slurmctld saves its state after a
    change, and the save that followed the job's start may be older than `since`; so the job is
    changed (a comment) a second after `since`, and the save that follows is waited for."""
    since = int(p.sh(controller, "date +%s; sleep 1.5").split()[0])
    p.sh(asker, f"scontrol update JobId={job} Comment=fault-1")
    until("the controller's state saved", lambda: int(p.sh(
        controller, f"stat -c %Y {STATE_FILE}", check=False).strip() or 0) > since, seconds=120, every=2)


def without(vms: ClusterVMs, p: Probe, victim: Node, live: list[Node], job: str) -> float:
    """What must go on while victim is off, checked; when (time.monotonic()) another SLURM
    controller answered (now, without SLURM)."""
    asker = live[0]
    failover = time.monotonic()
    if vms.cluster.services.slurm:
        until("another SLURM controller answering", lambda: "UP" in p.sh(asker, "scontrol ping", check=False),
              seconds=300, every=1)
        failover = time.monotonic()
        # The job outlives its controller: the new one, in control (a backup in standby answers
        # a ping, and refuses the rest), has it running; told to end then, it ends COMPLETED
        # (looked at every 5 s, so its record is seen before it ages out of the controller).
        record = until(f"job {job} running under the new controller", lambda: running(p, asker, job), seconds=300)
        p.sh(vms.cluster.node(field(record, "BatchHost")), f"touch {GO_FILE}")
        record = job_ended(p, asker, job, seconds=300)
        if job_state(record) != "COMPLETED":
            raise Failed(f"job {job}, running when its controller's node lost power, ended "
                         f"{job_state(record)}, not COMPLETED", record)
    put = f"etcdctl --command-timeout={ETCD_COMMAND_TIMEOUT}s put /clusterforge/fault-check {int(time.time())}"
    until("an etcd write on the live side (quorum kept)", lambda: "OK" in p.sh(asker, put, check=False), seconds=120)
    until("the VIP on exactly one live core node", lambda: len(vip_holders(vms, p, live, check=False)) == 1)
    if vms.cluster.services.ceph:
        p.sh(asker, "rbd create rbd/fault-check --size 64 && dev=$(rbd map rbd/fault-check) && "
                    "dd if=/dev/urandom of=$dev bs=1M count=16 oflag=direct status=none && "
                    "dd if=$dev of=/dev/null bs=1M count=16 iflag=direct status=none && rbd unmap $dev && "
                    "rbd rm rbd/fault-check", timeout=600)
    if vms.cluster.services.slurm:
        compute = [n.name for n in vms.cluster.with_role(Role.COMPUTE) if n != victim]
        if compute:
            p.sh(asker, f"srun -N1 -w {compute[0]} hostname", timeout=300)  # and a new job runs
    return failover


def fault_power_off(vms: ClusterVMs, p: Probe) -> Result:
    victim, failover, off = power_off(vms, p)
    on = time.monotonic()
    vms.start(victim.name)
    took = recover(vms, on)
    return Result("fault 1: hard power-off of a core node", "faults", "pass",
                  f"{victim.name} off for {on - off:.0f}s: quorum kept, VIP on one node, Ceph read and write, "
                  f"another SLURM controller after {failover:.0f}s, the job done; started again, fully healthy "
                  f"{took:.0f}s after its power-on",
                  extra={"recovery_seconds": round(took), "failover_seconds": round(failover),
                         "off_seconds": round(on - off), "node": victim.name})


def fault_partition(vms: ClusterVMs, p: Probe) -> Result:
    nodes = core(vms)
    holders = vip_holders(vms, p, nodes, check=False)
    victim = vms.cluster.node(holders[0]) if holders else nodes[0]
    live = [n for n in nodes if n != victim]
    machine = vms.machine(victim).attach()
    try:
        machine.set_link(False)
        until("one VIP holder among the others", lambda: len(vip_holders(vms, p, live, check=False)) == 1)
        guest = machine.guest
        until(f"{victim.name} drops the VIP", lambda: f" {vms.cluster.network.vip}/" not in guest.run(
            ["ip", "-4", "-o", "addr", "show"]).stdout)
        refused = guest.run(["etcdctl", "--command-timeout=5s", "put", "/clusterforge/fault-check", "minority"])
        if refused.returncode == 0:
            raise Failed(f"{victim.name}, cut off, could still write to etcd", refused.stdout + refused.stderr)
        if vms.cluster.services.slurm:
            def controllers() -> int:
                outside = sum(p.sh(n, "systemctl is-active slurmctld", check=False).strip() == "active" for n in live)
                return outside + int(guest.run(["systemctl", "is-active", "slurmctld"]).stdout.strip() == "active")

            until("exactly one slurmctld", lambda: controllers() == 1, seconds=300)
    finally:
        machine.set_link(True)
        machine.close()
    healed = time.monotonic()
    took = recover(vms, healed)
    return Result("fault 2: a node cut off, then healed", "faults", "pass",
                  f"{victim.name} cut off: one VIP holder, one slurmctld, its etcd writes refused; fully healthy "
                  f"{took:.0f}s after healing", extra={"recovery_seconds": round(took), "node": victim.name})


def fault_pause(vms: ClusterVMs, p: Probe) -> Result:
    vms.pause(True)
    time.sleep(PAUSE_SECONDS)  # the fault itself: every node frozen this long
    start = time.monotonic()
    vms.pause(False)
    took = recover(vms, start)
    return Result(f"fault 3: every node paused {PAUSE_SECONDS}s", "faults", "pass",
                  f"fully healthy {took:.0f}s after resuming", extra={"recovery_seconds": round(took)})


def fault_power_cycle(vms: ClusterVMs, p: Probe) -> Result:
    for node in vms.cluster.nodes:
        vms.kill(node.name)
    start = time.monotonic()
    vms.up()
    took = recover(vms, start, limit=formation_timeout(vms))  # every node boots at once: a formation again
    return Result("fault 4: every node power-cycled at once", "faults", "pass",
                  f"reassembled, fully healthy {took:.0f}s after power-on", extra={"recovery_seconds": round(took)})


FAULTS = (fault_power_off, fault_partition, fault_pause, fault_power_cycle)


def run_faults(vms: ClusterVMs, which: tuple[int, ...] = (1, 2, 3, 4),
               progress: Callable[[Result], None] = lambda r: None) -> list[Result]:
    results = []
    for number, fault in enumerate(FAULTS, 1):
        if number not in which:
            continue
        probe = Probe(vms)
        started = time.time()
        try:
            result = fault(vms, probe)
        except Failed as exc:
            result = Result(f"fault {number}: {fault.__name__.removeprefix('fault_').replace('_', ' ')}", "faults",
                            "fail", exc.reason, exc.evidence)
        result.started, result.seconds = started, time.time() - started
        result.evidence = result.evidence or probe.evidence()
        results.append(result)
        progress(result)
    return results

