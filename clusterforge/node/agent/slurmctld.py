"""slurmctld on exactly one core node at a time: the one holding the "slurmctld" election.

Stock Slurm 22.05, used as it is. slurm.conf lists every core node as a SlurmctldHost, in
inventory order, the same on every core node; only the elected node runs slurmctld. Started
there it is either the primary (listed first), which takes control at once, or a backup,
which takes control once no controller listed above it has answered for SlurmctldTimeout
(15 s; it would wait longer only for a heartbeat file in the state newer than its own start,
and the previous holder's is older: it was stopped or fenced first). A backup in standby
refuses every RPC, and an RPC refused that way is not sent again: a batch job whose end was
reported then was requeued and ran a second time (run 15). Since the election lets no other
controller run, the agent tells a backup to take control as soon as it listens (`scontrol
takeover INDEX`); should that not get through, it takes control by itself. Clients, slurmd and
`slurmd --conf-server` try the listed controllers in order and use the first that accepts
the connection (one in standby sends them on), so nothing is edited when the controller
moves. (Read in slurm-wlm 22.05.8: src/slurmctld/backup.c run_backup() and ping_controllers(),
controller.c _controller_index(), common/slurm_protocol_api.c slurm_open_controller_conn().)
Slurm's own HA, several slurmctld at once, would need StateSaveLocation shared between
them; here the state follows the controller instead:

- With Ceph, it is an RBD image (slurmstate.py) that only the elected node maps, after
  fencing the previous holder, and mounts at StateSaveLocation: a failover keeps everything
  (queue, running jobs, nodes).
- Without Ceph, it stays on each core node's own disk: a failover keeps the nodes (they
  register again) and the partition (slurm.conf), and loses the job queue and the running
  jobs' records. A node whose disk holds an older controller's state sets it aside rather
  than bring old jobs back (etcd records whose disk holds the newest state).

The module needs no other service: its stop path runs whatever else is blocked. A node
that cannot confirm it holds the role (lease gone, or etcd unreachable) stops slurmctld
before anything else, then unmounts and unmaps the state. What starting needs (munge, the
election in etcd, Ceph for the image) it checks itself and waits on, saying which. Every
step that takes the state confirms the role right before it acts; one that fails gives the
role up for a minute, so that another core node can try.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ...run import CommandError, run
from ..seed import Role, Service
from . import host, munge, slurmstate, wireguard
from .context import Ctx
from .core import Plan, State, Status, Step, StepFailed, Wait
from .etcd_client import EtcdError
from .slurmconf import (
    COMMAND_TIMEOUT,
    CONF,
    SLURM_USER,
    SLURMCTLD_DROPIN,
    SLURMCTLD_UNIT,
    STATE_DIR,
    controllers,
    judge,
    query_nodes,
    slurm_conf,
    slurmctld_dropin,
    summary,
)

name = "slurmctld"
needs: tuple[str, ...] = ()

ELECTION = "slurmctld"
STATE_KEY = "/clusterforge/slurmctld/state-holder"  # without Ceph: whose disk holds the newest state
TAKEOVER_SECONDS = 30  # telling a just-started backup to take control: it listens within seconds
GIVE_UP_SECONDS = 60  # after a failed takeover, leave the role to the other core nodes this long
LOCAL_STATE = ("its state is on this node's disk (no Ceph): a failover keeps the nodes and the partition "
               "and loses the job queue and the running jobs' records")


def applies(ctx: Ctx) -> bool:
    return ctx.seed.cluster.enabled(Service.SLURM) and ctx.me.has(Role.CORE)


def on_rbd(ctx: Ctx) -> bool:
    return ctx.seed.cluster.enabled(Service.CEPH)


@dataclass(frozen=True)
class Facts:
    conf: str | None
    dropin: str | None
    unit: host.Unit
    munge: bool  # munged runs here: slurmctld cannot work without it
    leader: bool  # this node holds the slurmctld election (confirmed in etcd this pass)
    token: int | None  # its fencing token
    holder: str  # who holds it when this node does not ("" nobody, or unknown)
    why: str  # why this node does not hold it
    devices: tuple[str, ...]  # mappings of the state image on this node
    term: int | None  # the fencing token this node mapped them with (None: no record)
    mounted: str  # the device mounted at StateSaveLocation ("" none)
    fs: str | None  # the signature on the mapped device while unmounted ("" blank; None: not looked at)
    image: slurmstate.Image | None  # the image as Ceph sees it (elected, nothing mapped yet)
    ceph_why: str  # why Ceph did not tell
    state_dir_ok: bool  # StateSaveLocation is the slurm user's
    local_state: bool  # (no Ceph) StateSaveLocation holds a controller's state
    state_holder: str | None  # (no Ceph) whose disk holds the newest state; "" nobody's yet; None unknown
    nodes: dict[str, str] | None  # (elected, running) node -> state as slurmctld sees them
    nodes_why: str
    strangers: tuple[str, ...] = ()  # registered, yet no node of the cluster (removed: revoked, unlisted)


def gave_up_marker(ctx: Ctx) -> Path:
    return ctx.run_dir / "slurmctld.gave-up"


def term_marker(ctx: Ctx) -> Path:
    """The fencing token this node mapped the state image with: a mapping from an earlier
    term may have been fenced by a holder in between, and is made anew."""
    return ctx.run_dir / "slurmctld.term"


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def facts(ctx: Ctx) -> Facts:
    units = host.units(SLURMCTLD_UNIT, munge.UNIT)
    unit, munge_ok = units[SLURMCTLD_UNIT], units[munge.UNIT].running
    gave_up = time.time() - (read_int(gave_up_marker(ctx)) or 0) < GIVE_UP_SECONDS
    election = ctx.election(ELECTION)
    leader = munge_ok and not gave_up and election.campaign()
    why = ("munged does not run here" if not munge_ok else
           f"gave the role up after a failed takeover (for {GIVE_UP_SECONDS} s)" if gave_up else election.why)
    holder = ""
    if not leader:
        try:
            current = election.leader()
            holder = current[0] if current else ""
        except EtcdError:
            pass
    devices, mounted = slurmstate.mapped(), slurmstate.mounted()
    fs: str | None = None
    image: slurmstate.Image | None = None
    ceph_why = ""
    local_state, state_holder = False, None
    if leader and on_rbd(ctx):
        if not devices:
            image, ceph_why = slurmstate.image()
        elif not mounted:
            fs = slurmstate.fs_type(devices[0])
    elif leader:
        local_state = STATE_DIR.is_dir() and any(p.name != "lost+found" for p in STATE_DIR.iterdir())
        try:
            kv = ctx.etcd.get(STATE_KEY)
            state_holder = kv.value.decode(errors="replace") if kv else ""
        except EtcdError:
            state_holder = None
    nodes, nodes_why = query_nodes() if leader and unit.running else (None, "")
    return Facts(strangers=strangers(ctx, nodes),
        conf=host.read_text(CONF), dropin=host.read_text(SLURMCTLD_DROPIN), unit=unit, munge=munge_ok,
        leader=leader, token=election.token if leader else None, holder=holder, why=why,
        devices=devices, term=read_int(term_marker(ctx)), mounted=mounted, fs=fs, image=image, ceph_why=ceph_why,
        state_dir_ok=host.dir_is(STATE_DIR, 0o755, SLURM_USER), local_state=local_state,
        state_holder=state_holder, nodes=nodes, nodes_why=nodes_why,
    )


def strangers(ctx: Ctx, nodes: dict[str, str] | None) -> tuple[str, ...]:
    """Registered nodes that are not the cluster's: in neither the seed (a core node's lists
    every node) nor etcd with a certificate the CA vouches for and has not revoked. A node
    `cluster.remove` took out while it was off comes back with the cluster's munge key, and
    `slurmd -Z` would register it again."""
    listed = {n.name for n in ctx.seed.cluster.nodes}
    unknown = [n for n in (nodes or {}) if n not in listed]
    if not unknown:
        return ()
    try:
        vouched = set(wireguard.read_published(ctx)[0])
    except EtcdError:
        return ()  # not sure: nothing is deleted
    return tuple(n for n in unknown if n not in vouched)


def plan(ctx: Ctx, f: Facts) -> Plan:
    if not f.leader:
        return plan_standby(ctx, f)
    files = plan_files(ctx, f)
    if files:
        return files
    return plan_rbd(ctx, f) if on_rbd(ctx) else plan_local(ctx, f)


def active(unit: host.Unit) -> bool:
    return unit.active not in ("", "inactive", "failed")


def plan_files(ctx: Ctx, f: Facts) -> list[Step]:
    """What every core node has: slurm.conf (the user commands read it), the unit's drop-in."""
    steps = []
    conf = slurm_conf(ctx.seed.cluster)
    if f.conf != conf:
        steps.append(Step("slurmctld: write slurm.conf", "every core node a controller, from the seed",
                          lambda: write_conf(conf, f.leader and f.unit.running)))
    dropin = slurmctld_dropin(on_rbd(ctx))
    if f.dropin != dropin:
        steps.append(Step("slurmctld: write slurmctld's drop-in", "only the elected core node runs it",
                          lambda: write_dropin(dropin)))
    if f.unit.enabled == "enabled":
        steps.append(Step("slurmctld: do not start slurmctld at boot", "only the elected core node runs it",
                          lambda: host.systemctl("disable", SLURMCTLD_UNIT)))
    return steps


def plan_standby(ctx: Ctx, f: Facts) -> Plan:
    if active(f.unit):  # first, before anything else: the role is not (or no longer) ours
        return [Step("slurmctld: stop the controller", f"this node does not hold the role: {f.why}",
                     lambda: host.systemctl("stop", SLURMCTLD_UNIT))]
    files = plan_files(ctx, f)
    if files:
        return files
    if f.mounted:
        return [Step("slurmctld: unmount the controller's state", "it belongs to the elected node only",
                     slurmstate.unmount)]
    if f.devices:
        device = f.devices[0]
        return [Step("slurmctld: unmap the state image", f"{device}: only the elected node maps it",
                     lambda: slurmstate.unmap(device))]
    return []


def plan_rbd(ctx: Ctx, f: Facts) -> Plan:
    spec = slurmstate.SPEC
    if f.devices and f.term != f.token:
        why = f"mapped in an earlier term (token {f.term}, now {f.token}): it may have been fenced since"
        if active(f.unit):
            return [Step("slurmctld: stop the controller", why, lambda: host.systemctl("stop", SLURMCTLD_UNIT))]
        if f.mounted:
            return [Step("slurmctld: unmount the controller's state", why, slurmstate.unmount)]
        device = f.devices[0]
        return [Step("slurmctld: unmap the state image", f"{device} {why}", lambda: slurmstate.unmap(device))]
    if active(f.unit) and not f.mounted:
        return [Step("slurmctld: stop the controller", f"it runs without its state ({spec}) mounted",
                     lambda: host.systemctl("stop", SLURMCTLD_UNIT))]
    if not f.devices:
        if f.image is None:  # most likely it answers no other core node either: wait, keep the role
            return Wait(f"slurmctld: waiting for Ceph to tell about {spec}: {f.ceph_why}")
        if not f.image.exists:
            return [take(ctx, "create the state image", f"first use: {spec}, {slurmstate.SIZE}, "
                                                       f"{', '.join(slurmstate.FEATURES)}",
                         lambda token: slurmstate.create())]
        others = slurmstate.unfenced(f.image)
        if others:
            return [take(ctx, "fence the previous holder", f"blocklist {', '.join(others)} before mapping {spec}",
                         lambda token: slurmstate.fence(others))]
        return [take(ctx, "map the state image", f"{spec} with its exclusive lock held",
                     lambda token: map_image(ctx, token))]
    if f.mounted and f.mounted not in f.devices:
        return Wait(f"slurmctld: {f.mounted} is mounted at {STATE_DIR}, not the state image: unmount it")
    device = f.mounted or f.devices[0]
    if not f.mounted:
        if f.fs == "":
            return [take(ctx, "make the state's filesystem", f"first use: {device} is blank",
                         lambda token: slurmstate.mkfs(device))]
        if f.fs != slurmstate.FS:
            return Wait(f"slurmctld: {device} ({spec}) holds {f.fs or 'something unknown'}, not "
                        f"{slurmstate.FS}: not formatting it; look at it by hand")
        return [take(ctx, "check and mount the state", f"{device} at {STATE_DIR}",
                     lambda token: slurmstate.mount(device, ctx.me.name, token))]
    extra = [d for d in f.devices if d != device]
    if extra:
        return [Step("slurmctld: unmap a second mapping", f"{extra[0]}: one mapping is enough",
                     lambda: slurmstate.unmap(extra[0]))]
    return plan_start(ctx, f)


def plan_local(ctx: Ctx, f: Facts) -> Plan:
    me = ctx.me.name
    if f.state_holder is None:
        return Wait("slurmctld: cannot read from etcd which core node holds the newest controller state")
    if f.state_holder not in ("", me) and f.local_state and not active(f.unit):
        return [take(ctx, "set aside an older state", f"{f.state_holder} ran the controller since",
                     lambda token: set_aside())]
    if f.state_holder != me:
        return [take(ctx, "record where the state is", f"the newest controller state will be on {me}'s disk",
                     lambda token: ctx.etcd.put(STATE_KEY, me))]
    return plan_start(ctx, f)


def plan_start(ctx: Ctx, f: Facts) -> Plan:
    if not f.state_dir_ok:
        return [take(ctx, "give the state to the slurm user", f"{STATE_DIR}, mode 0755",
                     lambda token: host.ensure_dir(STATE_DIR, 0o755, SLURM_USER))]
    if not f.unit.running:
        why = f"it stopped ({f.unit.result})" if f.unit.active == "failed" else "this node holds the role"
        return [take(ctx, "start the controller", why, lambda token: start(f.unit, index(ctx)))]
    if f.strangers:
        names = ",".join(f.strangers)
        return [take(ctx, "delete nodes that are not the cluster's", f"{names}: removed from the cluster (or never "
                                                                     "published); their slurmd registered anyway",
                     lambda token: run(["scontrol", "delete", f"NodeName={names}"], timeout=COMMAND_TIMEOUT))]
    return []


def take(ctx: Ctx, what: str, why: str, act: Callable[[int], object]) -> Step:
    """A step of the takeover: the role is confirmed in etcd right before it acts (and its
    fencing token handed on); if it fails, the role is given up for another node to try."""
    def apply() -> None:
        election = ctx.election(ELECTION)
        if not election.holding() or election.token is None:
            raise StepFailed(f"lost the role before I could {what}: {election.why}")
        try:
            act(election.token)
        except Exception:
            give_up(ctx)
            raise

    return Step(f"slurmctld: {what}", why, apply)


def give_up(ctx: Ctx) -> None:
    host.ensure_dir(ctx.run_dir, 0o755)
    host.write(gave_up_marker(ctx), f"{time.time():.0f}\n")
    try:
        ctx.election(ELECTION).resign()
    except EtcdError:
        pass  # the lease runs out by itself


def lost(ctx: Ctx) -> None:
    """For a keepalive that finds the lease gone between passes: stop now (the next pass
    unmounts and unmaps)."""
    host.systemctl("stop", SLURMCTLD_UNIT)


def map_image(ctx: Ctx, token: int) -> None:
    slurmstate.map_image()
    host.ensure_dir(ctx.run_dir, 0o755)
    host.write(term_marker(ctx), f"{token}\n")


def write_conf(text: str, restart: bool) -> None:
    host.write(CONF, text, 0o644)
    if restart:  # SlurmctldHost and MaxNodeCount are read at start only
        host.systemctl("try-restart", SLURMCTLD_UNIT)


def write_dropin(text: str) -> None:
    host.write(SLURMCTLD_DROPIN, text, 0o644)
    host.daemon_reload()


def set_aside() -> None:
    stale = STATE_DIR.with_name(f"{STATE_DIR.name}.stale-{time.time():.0f}")
    STATE_DIR.rename(stale)
    host.ensure_dir(STATE_DIR, 0o755, SLURM_USER)


def index(ctx: Ctx) -> int:
    """This node's place among the SlurmctldHost lines: 0 the primary, else a backup."""
    return [name for name, _ in controllers(ctx.seed.cluster)].index(ctx.me.name)


def start(unit: host.Unit, place: int) -> None:
    if unit.active == "failed":
        host.systemctl("reset-failed", SLURMCTLD_UNIT)
    host.systemctl("start", SLURMCTLD_UNIT)
    if place:
        take_control(place)


def take_control(place: int) -> None:
    """The backup at place told to take control now (scontrol takeover), tried until it listens,
    for at most TAKEOVER_SECONDS; one never told takes control by itself after SlurmctldTimeout."""
    deadline = time.monotonic() + TAKEOVER_SECONDS
    while time.monotonic() < deadline:
        try:
            if run(["scontrol", "takeover", str(place)], check=False, timeout=COMMAND_TIMEOUT).returncode == 0:
                return
        except CommandError:
            pass  # timed out: try again while there is time
        time.sleep(1)  # the daemon is starting: not listening yet


def health(ctx: Ctx, f: Facts) -> Status:
    local = "" if on_rbd(ctx) else f"; {LOCAL_STATE}"
    if not f.leader:
        if not f.holder:
            return Status(State.WAITING, f"no core node holds the controller role yet ({f.why})")
        return Status(State.OK, f"standby; the controller is {f.holder}{local}", detail={"controller": f.holder})
    me = ctx.me.name
    where = f" (state on {slurmstate.SPEC})" if on_rbd(ctx) else local
    if f.nodes is None:
        return Status(State.WAITING, f"controller started, not answering yet ({f.nodes_why}){where}",
                      detail={"controller": me})
    trouble = sorted(n for n, s in f.nodes.items() if judge(s) != "ok")
    extra = f" (not ok: {', '.join(trouble)})" if trouble else ""
    return Status(State.OK, f"controller; nodes: {summary(f.nodes)}{extra}{where}",
                  detail={"controller": me, "nodes": f.nodes})
