"""A machine's QMP monitor serves one client at a time: a command that finds it held says so
within seconds, and never kills the machine it could not reach."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from clusterforge.ssh import Target
from clusterforge.vm import accel
from clusterforge.vm.machine import Machine, MachineError, MachineSpec


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
