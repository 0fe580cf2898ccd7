"""Formation of the example cluster under QEMU, from one run: one node booted alone to
multi-user; the three-node cluster from power-on to all healthy (check-cluster OK); their
ratio (goal at most 2.5); each service's time to healthy; the agent's CPU seconds per node, and
where each node's CPU went (the busiest units, their commands included).

Run: .venv/bin/python bench/formation.py   (needs ./forge image; root for the cluster network)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from example_cluster import example_cluster  # noqa: E402

from clusterforge.verify import report  # noqa: E402
from clusterforge.verify.run import boot_timeline, cluster_view, wait_formed  # noqa: E402
from clusterforge.vm.cluster import ClusterVMs  # noqa: E402


def agent_cpu(vms: ClusterVMs) -> dict[str, float]:
    """CPU seconds of each node's agent, the commands it ran included (its cgroup's)."""
    seconds = {}
    for node in vms.cluster.nodes:
        out = vms.ssh(node).run("systemctl show clusterforge-agent -p CPUUsageNSec --value").stdout
        seconds[node.name] = int(out.strip()) / 1e9
    return seconds


# Each unit's and login session's CPU from cgroup v2, children included (keepalived's check
# scripts count as keepalived's; commands run over SSH as user.slice's).
UNIT_CPU = ("for d in /sys/fs/cgroup/system.slice/*/ /sys/fs/cgroup/system.slice/*/*/ /sys/fs/cgroup/user.slice/; "
            "do u=$(sed -n 's/^usage_usec //p' $d/cpu.stat 2>/dev/null) && echo \"$u $(basename $d)\"; done")


def unit_cpu(vms: ClusterVMs, top: int = 8) -> dict[str, list[tuple[str, float]]]:
    """Per node, the busiest units since power-on: (unit, CPU seconds), busiest first."""
    busiest = {}
    for node in vms.cluster.nodes:
        rows = [line.split(" ", 1) for line in vms.ssh(node).run(UNIT_CPU).stdout.splitlines()]
        units = sorted(((name, int(usec) / 1e6) for usec, name in rows
                        if name == "user.slice" or not name.endswith(".slice")), key=lambda r: -r[1])
        busiest[node.name] = units[:top]
    return busiest


def main() -> None:
    with example_cluster() as (cluster, make):
        alone = make("runs-1")
        single = alone.up(["s1"])["s1"]["multi-user"]
        alone.down(timeout=60)
        print(f"one node alone, power-on to multi-user:      {single:7.1f} s", flush=True)

        vms = make("runs-3")
        start = time.monotonic()
        try:
            vms.up()
            formed, view = wait_formed(vms, start)
            if formed is None:
                print(f"the cluster did not form: {view.get('problems')}")
                return
            print(f"three nodes, power-on to all healthy:       {formed:7.1f} s")
            print(f"ratio (goal at most 2.5):                    {formed / single:7.2f}")
            records = {n["node"]: n for n in (cluster_view(vms) or {}).get("nodes", [])}
            events = report.timeline(boot_timeline(vms), records)
            services = sorted({k for ev in events.values() for k in ev if k.endswith(" healthy")},
                              key=lambda k: max(ev.get(k, 0) for ev in events.values()))
            print("each service healthy on every node, after power-on:")
            for service in services:
                last = max(ev.get(service, 0) for ev in events.values())
                print(f"  {service.removesuffix(' healthy'):<10} {last:7.1f} s")
            cpu = agent_cpu(vms)
            print("agent CPU seconds per node (with the commands it ran), from power-on to now: "
                  + ", ".join(f"{n} {s:.1f}" for n, s in cpu.items()))
            print("where each node's CPU went, power-on to now (CPU seconds):")
            for name, units in unit_cpu(vms).items():
                print(f"  {name}: " + ", ".join(f"{unit} {seconds:.0f}" for unit, seconds in units))
        finally:
            vms.down(timeout=60)


if __name__ == "__main__":
    main()
