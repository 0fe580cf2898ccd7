"""Which CPU model QEMU's TCG should offer the nodes: one node of the example cluster booted to
SSH under each, then the same Python, ceph CLI and checksum work timed inside it.

Run: .venv/bin/python bench/tcg_cpu.py [MODEL ...]   (default: max qemu64; needs ./forge image
and root for the cluster network). A model is of use only if Ceph runs on it: see
clusterforge/vm/accel.py for what was measured and chosen.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from example_cluster import example_cluster  # noqa: E402

from clusterforge import inventory  # noqa: E402
from clusterforge.vm import accel  # noqa: E402
from clusterforge.vm.cluster import ClusterVMs  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORK = {
    "python (json, sha256)": "python3 -c 'import hashlib, json, time; t = time.time(); "
                             "[json.dumps({\"a\": list(range(100))}) for _ in range(20000)]; "
                             "[hashlib.sha256(b\"x\" * 1000).digest() for _ in range(50000)]; "
                             "print(time.time() - t)'",
    "ceph --version": "bash -c 'TIMEFORMAT=%R; { time ceph --version >/dev/null; } 2>&1'",
    "200 MiB through sha256sum": "bash -c 'TIMEFORMAT=%R; { time (dd if=/dev/zero bs=1M count=200 status=none "
                                 "| sha256sum >/dev/null); } 2>&1'",
}


def measure(model: str, cluster: inventory.Cluster, make: Callable[[str], ClusterVMs]) -> None:
    accel.TCG = accel.Accel("tcg", ("-accel", "tcg,thread=multi", "-cpu", model))
    accel.choose.cache_clear()
    vms = make(f"runs-{model}")
    assert vms.accel == accel.TCG, "TCG only: under KVM the nodes get the host's CPU"
    start = time.monotonic()
    vms.up(["s1"])
    print(f"-cpu {model}: s1 answering SSH after {time.monotonic() - start:.1f}s")
    ssh = vms.ssh(cluster.node("s1"))
    for what, command in WORK.items():
        print(f"  {what}: {float(ssh.run(command, timeout=600).stdout.strip()):.2f}s")
    vms.down(timeout=30)


def main() -> None:
    with example_cluster() as (cluster, make):
        for model in sys.argv[1:] or ["max", "qemu64"]:
            measure(model, cluster, make)


if __name__ == "__main__":
    main()
