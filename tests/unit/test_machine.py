"""The harness's machines: a QMP monitor held by another client is named within seconds and
its machine left alone; a cluster's machines run inside its network namespace; each gets the
memory its roles need."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from clusterforge import inventory
from clusterforge.inventory import Role
from clusterforge.ssh import Target
from clusterforge.vm import accel
from clusterforge.vm.cluster import size_for
from clusterforge.vm.machine import Machine, MachineError, MachineSpec

from .conftest import REPO


def test_a_held_monitor_is_named_not_waited_on_forever(tmp_path: Path) -> None:
    spec = MachineSpec(name="idle", memory_mb=128)  # no disk: the firmware finds nothing to boot and waits
    with Machine(spec, tmp_path, accel.TCG) as holder:
        other = Machine(spec, tmp_path, accel.TCG)
        start = time.monotonic()
        with pytest.raises(MachineError, match="another command may hold"):
            other.attach()
        assert time.monotonic() - start < 60
        assert holder.running, "a command that could not reach the monitor killed the machine"
        holder.close()
        assert other.attach().qmp("query-status")["status"] == "running"
        other.close()


def test_a_machine_in_a_namespace_runs_inside_it(tmp_path: Path) -> None:
    """QEMU, ssh and the harness's fetches share one prefix for the cluster's namespace."""
    (tmp_path / "n").mkdir()
    inside = Machine(MachineSpec(name="n", memory_mb=128, netns="cf-test"), tmp_path, accel.TCG).argv()
    assert inside[1:4] == ["netns", "exec", "cf-test"] and inside[4].endswith("qemu-system-x86_64")
    alone = Machine(MachineSpec(name="n", memory_mb=128), tmp_path, accel.TCG).argv()
    assert alone[0].endswith("qemu-system-x86_64") and alone[1:] == inside[5:]
    assert Target("10.0.0.11", tmp_path / "key", netns="cf-test").argv("true")[1:4] == ["netns", "exec", "cf-test"]


def test_the_five_node_cluster_gets_the_memory_its_roles_need() -> None:
    """qemu/five.yaml: each VM at least the README's minimum for its roles (3 GiB with Ceph
    daemons, 1 GiB without), at most 4 GiB, and all of them within three quarters of the host's
    memory when the minimums fit in it."""
    five = inventory.load(REPO / "qemu" / "five.yaml")
    sizes = {n.name: size_for(n, five, accel.TCG) for n in five.nodes}
    ceph = {n.name for n in five.nodes if n.has(Role.CORE) or n.has(Role.STORAGE)}
    assert len(ceph) == 4 and len(sizes) == 5
    assert all(3072 <= s.memory_mb <= 4096 for name, s in sizes.items() if name in ceph)
    assert all(1024 <= s.memory_mb <= 4096 for s in sizes.values())
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    if 4 * 3072 + 1024 <= host * 0.75:
        assert sum(s.memory_mb for s in sizes.values()) <= host * 0.75
    assert all(s.cpus >= 1 for s in sizes.values())
