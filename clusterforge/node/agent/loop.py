"""The agent's loop: level-triggered passes over every service, in dependency order.

A pass that changed something, or left something waiting, is followed by another soon;
while everything is converged the passes slow down (capped), so the agent costs little on a
healthy node but notices a change within seconds.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

from .. import seed as seedlib
from . import (
    backup,
    ceph,
    etcd,
    health,
    k3s,
    leave,
    munge,
    nic,
    osd,
    pxe,
    record,
    slurm,
    slurmctld,
    timesync,
    vip,
    wireguard,
)
from .context import Ctx
from .core import PassResult, State, Status, run_pass

# The order the services converge in (DESIGN.md): each needs only what comes before it.
SERVICES = [nic, wireguard, timesync, etcd, vip, pxe, ceph, osd, munge, slurmctld, slurm, k3s, backup]
# What to do at once when a singleton's lease is found gone between passes.
ON_LOST = {slurmctld.ELECTION: slurmctld.lost, pxe.ELECTION: pxe.lost}
FAST, SLOW = 2.0, 15.0  # seconds between passes: after a change, and at most when converged
KEEP_EVERY = 5.0
SEED_WAIT = 5.0


def log(line: str) -> None:
    print(line, flush=True)  # the unit sends standard output to the journal


class Stop(BaseException):
    pass


def _stop(signum: int, frame: FrameType | None) -> None:
    raise Stop


def load_seed() -> seedlib.Seed:
    """The node's seed, waiting for cloud-init to write it (a node booted with none waits
    forever, saying why, and a restart of the unit tries again)."""
    said = ""
    while True:
        try:
            return seedlib.load()
        except seedlib.SeedError as exc:
            if str(exc) != said:
                log(f"agent: waiting for the seed: {exc}")
                said = str(exc)
        time.sleep(SEED_WAIT)  # cloud-init writes the seed once: there is no event to wait on


def keep(ctx: Ctx, publisher: record.Publisher) -> None:
    """Leases on their own pace, whatever a pass is doing (a pass may wait on a slow command):
    the health record's, and every singleton's; a holder that finds its lease gone stops at once."""
    while True:
        time.sleep(KEEP_EVERY)  # a lease's pace: a third of the shortest TTL
        try:
            publisher.keep()
            for name, election in list(ctx.elections.items()):
                if election.keep() is False and name in ON_LOST:
                    log(f"{name}: lost the role ({election.why}); stopping now")
                    ON_LOST[name](ctx)
        except Exception as exc:  # noqa: BLE001 - the keeper must outlive any one failure
            log(f"agent: keeper: {exc}")


def main() -> int:
    signal.signal(signal.SIGTERM, _stop)
    if leave.removed():
        log(f"agent: this node was taken out of its cluster: {leave.removed()}; nothing to do (reinstall it to "
            "join again)")
        return 0
    try:
        seed = load_seed()
        ctx = Ctx(seed)
        log(f"agent: node {seed.me.name} of cluster {seed.cluster.name} "
            f"({', '.join(str(r) for r in seed.me.roles)})")
        started = time.time()
        publisher = record.Publisher(ctx)
        keeper = threading.Thread(target=keep, args=(ctx, publisher), daemon=True, name="keeper")
        keeper.start()
        if ctx.core:
            threading.Thread(target=vip.watch_majority, args=(ctx,), daemon=True, name="majority").start()
        latest: dict[str, Any] = {}
        try:
            health.serve(ctx, latest)
        except OSError as exc:
            log(f"agent: the health API cannot listen on port {health.PORT}: {exc}")
        statuses: dict[str, Status] = {}
        interval = FAST
        while True:
            def show(so_far: PassResult) -> None:
                latest["record"] = record.build(ctx, so_far, started)
                record.write_local(ctx, latest["record"])
                publisher.publish(latest["record"], so_far.statuses)

            reloaded = ctx.reload_seed()  # cluster.publish rewrites a core node's cluster.json
            if reloaded:
                log(reloaded)
            result = run_pass(ctx, SERVICES, statuses, log, after=show)
            statuses = result.statuses
            settled = not result.changed and all(
                s.state in (State.OK, State.OFF, State.DEGRADED) for s in statuses.values())
            interval = min(interval * 2, SLOW) if settled else FAST
            time.sleep(interval)  # the pace of a level-triggered loop, not a wait for a fact
    except (Stop, KeyboardInterrupt):
        log("agent: stopping")
        return 0


if __name__ == "__main__":
    sys.exit(main())
