"""Boot-to-multi-user times of the example cluster in QEMU: one node alone, then all three,
measured in one run (each node's timeline: firmware, kernel, multi-user, seed, ssh).

Run: .venv/bin/python bench/boot.py   (needs ./forge image; root for the cluster network)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from example_cluster import example_cluster  # noqa: E402

from clusterforge.vm.cluster import ClusterVMs  # noqa: E402


def measure(vms: ClusterVMs, names: list[str]) -> None:
    start = time.monotonic()
    timeline = vms.up(names)
    wall = time.monotonic() - start
    for name in names:
        phases = "  ".join(f"{phase} {t:6.1f}s" for phase, t in timeline[name].items() if phase != "at")
        print(f"  {name}: {phases}")
    print(f"  all {len(names)} answering SSH after {wall:.1f}s "
          f"({vms.accel.name}, {vms.spec(vms.cluster.nodes[0]).cpus} vCPU, "
          f"{vms.spec(vms.cluster.nodes[0]).memory_mb} MiB each)")
    vms.down(timeout=60)


def main() -> None:
    with example_cluster() as (_, vms):
        print("single node:")
        measure(vms("runs-1"), ["s1"])
        print("three nodes at once:")
        measure(vms("runs-3"), ["s1", "s2", "s3"])


if __name__ == "__main__":
    main()
