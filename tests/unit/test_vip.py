"""The floating address follows the etcd majority: the agent's linearizable reads from its
own member, against a real 3-member etcd on loopback, and keepalived's check script run by sh."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from clusterforge.node.agent import vip

from .etcd_cluster import EtcdCluster, free_ports


def check_passes(script: Path) -> bool:
    return subprocess.run(["sh", str(script)], check=False).returncode == 0


def test_the_vip_check_follows_the_members_majority(etcd: EtcdCluster, tmp_path: Path) -> None:
    stamp, script = tmp_path / "run" / "etcd-majority", tmp_path / "check"
    script.write_text(vip.check_script(stamp))
    assert not check_passes(script), "no read served yet: the check fails"

    own = etcd.members[0]
    client = etcd.client([own.client_url], timeout=2)
    assert vip.read_majority(client, stamp)
    assert check_passes(script)

    # A read served FRESH_SECONDS ago or more no longer counts.
    old = time.time() - vip.FRESH_SECONDS - 5
    os.utime(stamp, (old, old))
    assert not check_passes(script)

    # The member cut off from the other two cannot serve a linearizable read: no new stamp.
    for other in etcd.members[1:]:
        etcd.stop_member(other.name)
    assert not vip.read_majority(client, stamp)
    assert stamp.stat().st_mtime == old and not check_passes(script)

    etcd.ensure_running()
    assert vip.read_majority(etcd.client([own.client_url], timeout=5), stamp)
    assert check_passes(script)


def test_no_member_answering_means_no_stamp(etcd: EtcdCluster, tmp_path: Path) -> None:
    stamp = tmp_path / "etcd-majority"
    client = etcd.client([f"https://127.0.0.1:{free_ports(1)[0]}"], timeout=1)
    assert not vip.read_majority(client, stamp)
    assert not stamp.exists()
