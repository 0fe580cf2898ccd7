"""A hung transmit queue on the LAN interface is reset (agent/nic.py): the plan on facts, and
the interface and its kernel counters read from this machine's own sysfs."""

from __future__ import annotations

import json
from pathlib import Path

from clusterforge.node import seed as seedlib
from clusterforge.node.agent import nic
from clusterforge.node.agent.context import Ctx


def ctx_of(rendered: Path, tmp_path: Path) -> Ctx:
    seed = seedlib.Seed(seedlib.ClusterSeed.from_dict(json.loads((rendered / "inventory.json").read_text())),
                        seedlib.Identity("lab", "s1"))
    return Ctx(seed, run_dir=tmp_path)


def test_a_growing_count_of_transmit_timeouts_resets_the_nic(rendered: Path, tmp_path: Path) -> None:
    ctx = ctx_of(rendered, tmp_path)
    first = nic.plan(ctx, nic.Facts("enp0s6", 0, -1))
    assert [(s.name, s.why) for s in first] == [("nic: note the transmit timeouts", "enp0s6: 0 so far")]  # type: ignore[union-attr]
    first[0].apply()  # type: ignore[index]
    assert nic.facts(ctx).seen == 0
    assert nic.plan(ctx, nic.Facts("enp0s6", 0, 0)) == []
    hung = nic.plan(ctx, nic.Facts("enp0s6", 3, 0))
    assert [s.name for s in hung] == ["nic: reset enp0s6"]  # type: ignore[union-attr]
    assert "its transmit queue hung (3 timeouts since the last look)" in hung[0].why  # type: ignore[index]
    # After a reset the device's counters start at zero again: noted, not a reason to reset.
    assert [s.name for s in nic.plan(ctx, nic.Facts("enp0s6", 0, 3))] == ["nic: note the transmit timeouts"]  # type: ignore[union-attr]
    assert nic.plan(ctx, nic.Facts("", 0, 0)) == []  # no address yet: nothing to watch


def test_the_interface_and_its_counters_come_from_the_kernel() -> None:
    assert nic.lan_interface("127.0.0.1") == "lo"
    assert nic.lan_interface("192.0.2.77") == ""  # TEST-NET: nobody here holds it
    real = [p.name for p in nic.SYS_NET.iterdir() if (p / "queues" / "tx-0" / "tx_timeout").exists()]
    assert real and all(nic.tx_timeouts(name) >= 0 for name in real)
