"""Boot-to-multi-user times of the example cluster in QEMU: one node alone, then all three,
measured in one run (each node's timeline: firmware, kernel, multi-user, seed, ssh).

Run: .venv/bin/python bench/boot.py   (needs ./forge image; root for the cluster network)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clusterforge import inventory, render  # noqa: E402
from clusterforge.factory.context import BuildContext  # noqa: E402
from clusterforge.factory.pipeline import build_image  # noqa: E402
from clusterforge.paths import Paths  # noqa: E402
from clusterforge.vm.cluster import ClusterVMs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


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
    image = build_image(BuildContext.create()).qcow2
    cluster = inventory.load(REPO / "examples" / "cluster.yaml")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        render.render(cluster, root / "dist", root / "state")
        print("single node:")
        measure(ClusterVMs(cluster, image, Paths(root / "dist", root / "state", root / "runs-1")), ["s1"])
        print("three nodes at once:")
        measure(ClusterVMs(cluster, image, Paths(root / "dist", root / "state", root / "runs-3")),
                ["s1", "s2", "s3"])


if __name__ == "__main__":
    main()
