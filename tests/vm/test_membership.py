"""Nodes join, leave and are replaced with nothing lost (issue 20), on the shared cluster, in
the order a person would do it: the compute node of test_selfhosted.py runs jobs and is
removed; a storage node joins, takes data, and is removed with nothing lost; a core node's
machine dies for good and a new machine takes its place. Run by `./forge test --all`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from clusterforge import inventory
from clusterforge.paths import Paths
from clusterforge.verify.faults import until
from clusterforge.vm.cluster import ClusterVMs

from .conftest import FORMED_INVENTORY, FORMED_RUNS, NEW, figure, forge, on_formed, service_starts, sh

DEADLINE = 1200  # seconds for the cluster to take something in (an install, a backfill) under TCG
CORE = ["s1", "s2", "s3"]
STORAGE_MAC = "52:54:00:00:00:14"  # a storage node that comes later (s4)
REPLACEMENT_MAC = "52:54:00:00:00:62"  # the machine that takes s2's place
PROBE_IMAGE = "rbd/membership-probe"


def cluster_of(path: Path) -> ClusterVMs:
    """The shared cluster's machines as this inventory lists them."""
    paths = Paths.resolve(runs=str(FORMED_RUNS))
    return ClusterVMs(inventory.load(path, state=paths.state), Path("/nonexistent"), paths)


def healthy(vms: ClusterVMs, node: str = "s1") -> bool:
    return vms.ssh(vms.cluster.node(node)).run("check-cluster", check=False, timeout=120).returncode == 0


def ceph(vms: ClusterVMs, command: str, node: str = "s1") -> dict:  # type: ignore[type-arg]
    return json.loads(sh(vms, node, f"ceph {command} -f json"))  # type: ignore[no-any-return]


def hosts_with_osds(vms: ClusterVMs) -> dict[str, list[str]]:
    """host -> the status of each of its OSDs."""
    tree = ceph(vms, "osd tree")["nodes"]
    by_id = {n["id"]: n for n in tree}
    return {n["name"]: [by_id[c].get("status", "") for c in n.get("children", [])] for n in tree
            if n["type"] == "host"}


def ceph_clean(vms: ClusterVMs) -> bool:
    status = ceph(vms, "status")
    pgs = status["pgmap"]
    clean = sum(s["count"] for s in pgs.get("pgs_by_state", []) if s["state_name"] == "active+clean")
    return status["health"]["status"] == "HEALTH_OK" and clean == pgs["num_pgs"]


def write_probe(vms: ClusterVMs, node: str) -> str:
    """64 MiB of random data in an RBD image; its sha256."""
    return sh(vms, node, f"rbd create --size 64 {PROBE_IMAGE} && dev=$(rbd device map {PROBE_IMAGE}) && "
                         "head -c 64M /dev/urandom > /tmp/probe && dd if=/tmp/probe of=$dev bs=4M oflag=direct "
                         "status=none && rbd device unmap $dev && sha256sum < /tmp/probe | cut -d' ' -f1",
              timeout=900).strip()


def read_probe(vms: ClusterVMs, node: str) -> str:
    return sh(vms, node, f"dev=$(rbd device map --read-only {PROBE_IMAGE}) && "
                         "sha=$(head -c 64M $dev | sha256sum | cut -d' ' -f1) && rbd device unmap $dev && echo $sha",
              timeout=900).strip()


def ensure_grown(formed: ClusterVMs, grown: Path) -> ClusterVMs:
    """c1 in the cluster (test_selfhosted.py leaves it there; run alone, this publishes and starts it)."""
    vms = cluster_of(grown)
    if not vms.machine(vms.cluster.node("c1")).running:
        forge(*on_formed("cluster.publish", inventory=grown), timeout=3600)
        forge(*on_formed("cluster.start", "c1", inventory=grown), timeout=3600)
    until("c1 healthy in the cluster", lambda: any(
        n["node"] == "c1" and n.get("healthy")
        for n in json.loads(sh(formed, "s1", "check-cluster --json", check=False) or "{}").get("nodes", [])),
          seconds=DEADLINE)
    return vms


@pytest.mark.all_only
def test_a_compute_node_runs_jobs_then_leaves(formed: ClusterVMs, grown: Path) -> None:
    vms = ensure_grown(formed, grown)
    names = until("srun on four nodes", lambda: (lambda out: out if len(out.split()) == 4 else None)(
        sh(formed, "s1", "srun -N4 -t 2 hostname | sort", check=False, timeout=300)), seconds=DEADLINE)
    assert names.split() == ["c1", "s1", "s2", "s3"]
    c1_key = sh(vms, "c1", "wg show wg0 public-key").strip()

    removed = forge(*on_formed("cluster.remove", "c1"), timeout=3600)
    print(removed.stdout)
    assert "c1 removed from cluster vmlab" in removed.stdout
    assert "SLURM: c1 drained" in removed.stdout and "etcd and the agents refuse c1's certificate" in removed.stdout
    until("sinfo without c1", lambda: "c1" not in sh(formed, "s1", "sinfo -h -N -o %N", check=False).split(),
          seconds=300)
    until("check-cluster OK without c1", lambda: healthy(formed), seconds=DEADLINE)
    assert "c1" not in sh(formed, "s1", "check-cluster")
    # Its certificate is refused: by etcd, and by every agent's mesh.
    refused = sh(vms, "c1", "etcdctl --command-timeout=10s get /clusterforge/crl >/dev/null 2>&1; echo rc=$?",
                 check=False)
    assert "rc=0" not in refused, refused
    for node in CORE:
        until(f"{node}'s mesh without c1", lambda node=node: c1_key not in sh(formed, node, "wg show wg0 peers"),
              seconds=300)
    # Its own services stopped and left off; its record released, its certificate revoked.
    assert sh(vms, "c1", "systemctl is-enabled clusterforge-agent slurmd", check=False).split() == ["disabled"] * 2
    state = Paths.resolve().cluster_state("vmlab")
    assert NEW not in json.loads((state / "nodes.json").read_text())["nodes"]
    assert any(r["node"] == "c1" for r in json.loads((state / "revoked.json").read_text())["revoked"].values())


@pytest.mark.all_only
def test_a_storage_node_joins_and_leaves_with_nothing_lost(formed: ClusterVMs, tmp_path: Path) -> None:
    sha = write_probe(formed, "s1")
    grown = tmp_path / "lab-storage.yaml"
    grown.write_text(FORMED_INVENTORY.read_text() + f'  - mac: "{STORAGE_MAC}"\n    roles: [storage]\n'
                                                    "    disks: [/dev/vdb]\n")
    forge(*on_formed("cluster.publish", inventory=grown), timeout=3600)
    try:
        before = service_starts(formed, CORE)
        started = forge(*on_formed("cluster.start", "s4", inventory=grown), timeout=3600, check=False)
        assert started.returncode == 0, f"{started.stdout[-3000:]}{started.stderr[-3000:]}"
        until("s4's OSD up and in, every placement group clean", lambda: hosts_with_osds(formed).get("s4") == ["up"]
              and ceph_clean(formed), seconds=DEADLINE, every=10)
        osd = next(n for n in ceph(formed, "osd df")["nodes"] if n["name"] == f"osd.{s4_osd(formed)}")
        figure(f"storage node joined: osd.{osd['id']} holds {osd['pgs']} placement groups")
        assert osd["pgs"] > 0  # data moved onto it
        assert service_starts(formed, CORE) == before, "a service on a core node restarted when s4 joined"
        assert read_probe(formed, "s3") == sha

        removed = forge(*on_formed("cluster.remove", "s4"), timeout=7200)
        print(removed.stdout)
        assert "every placement group clean on the other OSDs" in removed.stdout
        assert "s4" not in hosts_with_osds(formed)
        until("HEALTH_OK without s4", lambda: ceph_clean(formed), seconds=DEADLINE, every=10)
        assert read_probe(formed, "s2") == sha
        until("check-cluster OK without s4", lambda: healthy(formed), seconds=DEADLINE)
    finally:
        forge(*on_formed("cluster.kill", "s4", inventory=grown), check=False)
        sh(formed, "s1", f"rbd rm {PROBE_IMAGE}", check=False, timeout=300)


def s4_osd(vms: ClusterVMs) -> int:
    tree = ceph(vms, "osd tree")["nodes"]
    host = next(n for n in tree if n["type"] == "host" and n["name"] == "s4")
    return int(host["children"][0])


@pytest.mark.all_only
def test_a_dead_core_node_is_replaced(formed: ClusterVMs) -> None:
    # The cluster as the formed inventory has it: c1, published by a test before this one that
    # failed before removing it, is taken out first (the replacement refuses an inventory
    # without a node the cluster runs, rightly).
    if NEW in json.loads((Paths.resolve().cluster_state("vmlab") / "nodes.json").read_text())["nodes"]:
        forge(*on_formed("cluster.remove", "c1"), timeout=3600)
    forge(*on_formed("cluster.kill", "s2"))
    replaced = forge(*on_formed("cluster.replace", "s2", "--mac", REPLACEMENT_MAC), timeout=3600)
    print(replaced.stdout)
    assert re.search(r"etcd: s2's member removed \(2 left\)", replaced.stdout), replaced.stdout
    assert "Ceph: monitor s2 removed (2 left)" in replaced.stdout
    assert f'mac: "{REPLACEMENT_MAC}"' in FORMED_INVENTORY.read_text()
    started = forge(*on_formed("cluster.start", "s2"), timeout=3600, check=False)
    assert started.returncode == 0, f"{started.stdout[-3000:]}{started.stderr[-3000:]}\nlogs: {formed.dir}/s2/"
    vms = cluster_of(FORMED_INVENTORY)
    assert sh(vms, "s2", "cat /sys/class/net/*/address").count(REPLACEMENT_MAC) == 1
    until("three healthy etcd members", lambda: len(re.findall(r" is healthy", sh(
        vms, "s1", "etcdctl endpoint health --cluster 2>&1", check=False))) == 3, seconds=DEADLINE)
    until("three monitors in quorum, three OSDs up, HEALTH_OK", lambda: len(ceph(vms, "status")["quorum_names"]) == 3
          and all(v == ["up"] for v in hosts_with_osds(vms).values()) and ceph_clean(vms), seconds=DEADLINE, every=10)
    # It serves the cluster's PXE again once it has the published files.
    forge(*on_formed("cluster.publish"), timeout=3600)
    until("check-cluster OK with the new s2", lambda: healthy(vms, "s2"), seconds=DEADLINE)
