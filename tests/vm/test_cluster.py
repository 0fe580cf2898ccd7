"""The example inventory as a 3-node QEMU cluster: up, faults, down, destroy."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from clusterforge import inventory
from clusterforge.factory import pipeline
from clusterforge.vm.cluster import ClusterVMs


def pings(vms: ClusterVMs, source: str, target: str) -> bool:
    ip = vms.cluster.node(target).ip
    proc = vms.ssh(vms.cluster.node(source)).run(f"ping -c 2 -W 2 {ip}", check=False, timeout=60)
    return proc.returncode == 0


def qemu_processes(rundir: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(rundir) in line]


@pytest.fixture
def vms(image: pipeline.Artifacts, lab: tuple[inventory.Cluster, Path, Path], rundir: Path):  # type: ignore[no-untyped-def]
    cluster, rendered, state = lab
    vms = ClusterVMs(cluster, image.qcow2, rendered, state, rundir)
    try:
        yield vms
    finally:
        vms.down(timeout=30)


def test_three_node_cluster(vms: ClusterVMs, rundir: Path) -> None:
    timeline = vms.up()
    assert set(timeline) == {"s1", "s2", "s3"}
    for node in vms.cluster.nodes:
        target = vms.ssh(node)
        assert target.run("hostname").stdout.strip() == node.name
        assert f"inet {node.ip}/24" in target.run("ip -4 -o addr show").stdout
        assert target.run("lsblk -dn -o NAME,SIZE /dev/vdb").stdout.split()[1] == "12G"
        assert {"firmware", "kernel", "multi-user", "seed", "ssh"} <= set(timeline[node.name])
    assert (rundir / "lab" / "timeline.json").exists()
    for source, target_name in (("s1", "s2"), ("s2", "s3"), ("s3", "s1")):
        assert pings(vms, source, target_name)

    status = {row["node"]: row for row in vms.status()}
    assert {row["state"] for row in status.values()} == {"running"}

    vms.kill("s3")
    assert not vms.machine(vms.cluster.node("s3")).running
    assert not pings(vms, "s1", "s3")
    vms.start("s3")
    assert pings(vms, "s1", "s3")

    vms.set_link("s2", up=False)
    assert not pings(vms, "s1", "s2")
    vms.set_link("s2", up=True)
    assert pings(vms, "s1", "s2")

    vms.pause(True)
    assert {row["state"] for row in vms.status()} == {"paused"}
    vms.pause(False)
    assert {row["state"] for row in vms.status()} == {"running"}

    vms.down(timeout=120)
    assert qemu_processes(rundir) == []
    assert not vms.net.exists()
    vms.destroy()
    assert not (rundir / "lab").exists()
