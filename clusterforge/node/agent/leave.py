"""A node taken out of the cluster by `./forge cluster.remove` stops taking part in it.

    python3 -m clusterforge.node.agent.leave     run on the node, over SSH, by cluster.remove

Once its OSDs are purged and its jobs drained, the node stops and disables the agent and
every cluster service the agent started on it (so none comes back at boot), leaves the
WireGuard mesh, and marks itself removed: an agent started on it again says so and does
nothing. Nothing on its disks is erased: a removed storage node keeps its OSDs' volumes
until someone wipes the machine (its certificate is revoked and its OSDs' keys are gone, so
the cluster takes neither back).
"""

from __future__ import annotations

import sys
import time

from ...run import run
from . import ceph, munge, wireguard
from .context import STATE_DIR
from .k3s import AGENT_UNIT, SERVER_UNIT
from .slurmconf import SLURMD_UNIT

MARKER = STATE_DIR / "removed"  # written last; the agent's unit does not start while it exists
AGENT_UNIT_NAME = "clusterforge-agent.service"
# The agent first: it would start the others again.
UNITS = (AGENT_UNIT_NAME, SLURMD_UNIT, SERVER_UNIT, AGENT_UNIT, *reversed(ceph.TARGETS), munge.UNIT)


def removed() -> str:
    """Why this node must not take part any more ("" when it may)."""
    try:
        return MARKER.read_text().strip()
    except OSError:
        return ""


def leave(why: str) -> list[str]:
    done = []
    for unit in UNITS:
        # A unit that is not installed on this node is fine: there is nothing to stop.
        if run(["systemctl", "disable", "--now", unit], check=False).returncode == 0:
            done.append(unit)
    listed = run(["systemctl", "list-units", "--all", "--plain", "--no-legend", "ceph-osd@*", "ceph-volume@*"],
                 check=False).stdout.splitlines()
    for unit in (line.split()[0] for line in listed if line.split()):
        run(["systemctl", "disable", "--now", unit], check=False)
        done.append(unit)
    if run(["ip", "link", "show", wireguard.IFACE], check=False).returncode == 0:
        run(["ip", "link", "del", wireguard.IFACE])
        done.append(wireguard.IFACE)
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    MARKER.write_text(f"{why} ({time.strftime('%Y-%m-%d %H:%M:%S %Z')})\n")
    return done


def main(argv: list[str]) -> int:
    why = " ".join(argv) or "removed from the cluster by cluster.remove"
    done = leave(why)
    print(f"left the cluster: stopped {', '.join(done) or 'nothing (nothing ran)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
