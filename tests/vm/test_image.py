"""The built image boots alone: qcow2 + seed ISO (BIOS), raw under UEFI (./forge test --all).

By default the shared cluster (tests/vm/test_formed.py) boots the qcow2 with seed ISOs under
BIOS and checks what these check, and the USB install boots the raw image under UEFI."""

from __future__ import annotations

from pathlib import Path

import pytest

from clusterforge import inventory
from clusterforge.factory import pipeline
from clusterforge.run import run
from clusterforge.ssh import Target
from clusterforge.vm.machine import Drive, Machine, MachineSpec, Nic
from clusterforge.vm.network import free_port, user_net

BOOT_TIMEOUT = 600


def overlay(base: Path, fmt: str, target: Path) -> Path:
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(base.resolve()), str(target)])
    return target


def boot_node(lab: tuple[inventory.Cluster, Path, Path], node_name: str, disk: Drive, rundir: Path,
              firmware: str) -> None:
    """Boot one node of the example cluster with its seed ISO and check the seed was applied."""
    cluster, rendered, state = lab
    node = cluster.node(node_name)
    port = free_port()
    net = user_net(cluster.network.subnet, cluster.network.gateway, {port: (node.ip, 22)})
    seed = Drive(rendered / "nodes" / node.name / "seed.iso", format="raw", media="cdrom")
    spec = MachineSpec(name=node.name, memory_mb=2048, cpus=2, firmware=firmware,
                       drives=(disk, seed), nics=(Nic(node.mac, net),))
    with Machine(spec, rundir) as m:
        m.wait_console(r"Linux version \d", 180, phase="kernel")
        m.wait_console(rf"^{node.name} login: ", BOOT_TIMEOUT, phase="login")
        target = Target("127.0.0.1", state / cluster.name / "ssh" / "id_ed25519", port=port)
        target.wait(120)
        assert target.run("hostname").stdout.strip() == node.name
        assert target.run("hostname -f").stdout.strip() == f"{node.name}.{cluster.domain}"
        facts = target.run("cat /etc/clusterforge/identity.json").stdout
        assert f'"node": "{node.name}"' in facts
        assert target.run("stat -c %a /etc/clusterforge/pki/node.key").stdout.strip() == "600"
        assert str(node.ip) in target.run("ip -4 -o addr show").stdout
        # The user's key works for the operator account too.
        keys = target.run("cat /home/forge/.ssh/authorized_keys").stdout
        assert cluster.ssh_authorized_keys[0].split()[1] in keys
        # Services wait for the agent: nothing starts with stock settings.
        active = target.run("systemctl is-active etcd slurmd slurmctld munge ceph.target", check=False).stdout
        assert set(active.split()) == {"inactive"}, active
        m.shutdown(timeout=120)


@pytest.mark.all_only
def test_qcow2_with_seed_iso_boots_bios(image: pipeline.Artifacts, lab: tuple[inventory.Cluster, Path, Path],
                                        rundir: Path) -> None:
    disk = Drive(overlay(image.qcow2, "qcow2", rundir / "s1.qcow2"), bootindex=1)
    boot_node(lab, "s1", disk, rundir, firmware="bios")


@pytest.mark.all_only
def test_raw_boots_uefi(image: pipeline.Artifacts, lab: tuple[inventory.Cluster, Path, Path],
                        rundir: Path) -> None:
    disk = Drive(overlay(image.raw, "raw", rundir / "s2.qcow2"), bootindex=1)
    boot_node(lab, "s2", disk, rundir, firmware="uefi")
