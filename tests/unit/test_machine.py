"""A machine's QMP monitor serves one client at a time: a command that finds it held says so
within seconds, and never kills the machine it could not reach."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

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
