"""Nodes join, leave and are replaced (issue 20): the decisions of cluster.remove and
cluster.replace on what Ceph answered on the example cluster (recorded JSON), the new MAC
written into the inventory file, the state moving to the new machine with new keys and the
old certificate revoked, cluster.publish's refusals, and the agent's etcd backups."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from clusterforge import identity, inventory, membership, publish, render, revocation
from clusterforge.log import UserError
from clusterforge.node import seed as seedlib
from clusterforge.node.agent import backup
from clusterforge.node.agent.context import Ctx
from clusterforge.paths import Paths

from .conftest import DATA, EXAMPLE, FIXED_STATE

# Recorded on the formed example cluster (qemu/lab.yaml); grown-osd-tree.json is it with a fourth
# storage host (s4) added to the recorded tree.
CEPH = DATA / "facts" / "ceph"
S2, NEW = "52:54:00:00:00:12", "52:54:00:00:00:62"


def recorded(name: str) -> Any:
    return json.loads((CEPH / f"{name}.json").read_text())


def view(prefix: str) -> membership.CephView:
    return membership.CephView.parse(recorded(f"{prefix}-osd-tree"), recorded(f"{prefix}-pools"),
                                     recorded(f"{prefix}-rules"))


# ---------------------------------------------------------------- what Ceph says


def test_ceph_view_of_the_example_cluster() -> None:
    lab = view("lab")
    assert {o.host for o in lab.osds} == {"s1", "s2", "s3"} and all(o.up and o.inside for o in lab.osds)
    assert [(p.name, p.size, p.domain) for p in lab.pools] == [("rbd", 3, "host"), ("device_health_metrics", 3, "host")]
    assert lab.on("s2") == [next(o.id for o in lab.osds if o.host == "s2")]


def test_a_storage_host_leaves_only_when_the_others_keep_every_copy() -> None:
    lab = view("lab")  # three storage hosts, three copies
    assert membership.removal_refusal(lab, "s3") == (
        "without s3, pool rbd keeps 3 copies on 2 storage hosts: its placement groups could "
        "never be clean again; add a storage node first")
    grown = view("grown")  # a fourth storage host, s4
    assert membership.removal_refusal(grown, "s4") is None
    assert membership.removal_refusal(grown, "c1") is None  # holds no OSD


def test_the_last_copy_never_leaves() -> None:
    lab = view("lab")
    alone = membership.CephView(tuple(o for o in lab.osds if o.host == "s1"),
                                tuple(membership.Pool(p.name, 1, "osd") for p in lab.pools))
    assert membership.removal_refusal(alone, "s1") == (
        "s1 holds the last copy of pool rbd's data: no other OSD is up")


# ---------------------------------------------------------------- the inventory file


@pytest.mark.parametrize("written", ['"52:54:00:00:00:12"', "52-54-00-00-00-12", '"5254.0000.0012"'])
def test_the_new_mac_goes_where_the_old_one_was_written(tmp_path: Path, written: str) -> None:
    text = EXAMPLE.read_text().replace('"52:54:00:00:00:12"', written)
    path = tmp_path / "lab.yaml"
    path.write_text(text)
    line = membership.set_mac(path, S2, NEW)
    assert line == f"{path}:31: mac {S2} -> {NEW}"
    assert path.read_text() == text.replace(written.strip('"'), NEW)  # quotes, comments and layout kept
    assert inventory.load(path).nodes[1].mac == NEW


def test_a_mac_written_twice_or_not_at_all_is_not_changed(tmp_path: Path) -> None:
    path = tmp_path / "lab.yaml"
    path.write_text(EXAMPLE.read_text() + f"# s2 used to be {S2}\n")
    with pytest.raises(UserError, match="is written 2 times"):
        membership.set_mac(path, S2, NEW)
    with pytest.raises(UserError, match="is written 0 times"):
        membership.set_mac(path, "52:54:00:00:00:99", NEW)
    assert path.read_text() == EXAMPLE.read_text() + f"# s2 used to be {S2}\n"


# ---------------------------------------------------------------- state moves to the new machine


@pytest.fixture
def lab(tmp_path: Path) -> tuple[Path, Paths]:
    shutil.copytree(FIXED_STATE, tmp_path / "state")
    path = tmp_path / "lab.yaml"
    path.write_text(EXAMPLE.read_text())
    paths = Paths(out=tmp_path / "dist", state=tmp_path / "state", runs=tmp_path / "runs")
    render.render(inventory.load(path, state=paths.state), paths.out, paths.state)
    return path, paths


def test_new_hardware_takes_the_name_and_address_with_keys_of_its_own(lab: tuple[Path, Paths]) -> None:
    path, paths = lab
    state = paths.cluster_state("lab")
    old_cert = (state / "nodes" / S2.replace(":", "-") / "tls.crt").read_text()
    old_wg = (state / "nodes" / S2.replace(":", "-") / "wireguard.key").read_text()
    cluster = inventory.load(path, state=paths.state)
    membership.retire(cluster, paths, "s2", S2, f"cluster.replace by {NEW}", successor=NEW)
    membership.set_mac(path, S2, NEW)
    new = inventory.load(path, state=paths.state)
    s2 = new.node("s2")
    assert (s2.mac, str(s2.ip), str(s2.overlay_ip)) == (NEW, "10.0.0.12", "10.99.0.12")
    render.render(new, paths.out, paths.state)
    mine = state / "nodes" / NEW.replace(":", "-")
    assert (mine / "wireguard.key").read_text() != old_wg
    new_cert = (mine / "tls.crt").read_text()
    assert x509.load_pem_x509_certificate(new_cert.encode()).subject.rfc4514_string() == "CN=s2"
    crl = (state / revocation.CRL_FILE).read_text()
    assert revocation.is_revoked(crl, old_cert) and not revocation.is_revoked(crl, new_cert)
    assert not (state / "nodes" / S2.replace(":", "-")).exists()
    # The seeds carry the CRL: every node refuses the old machine from its first boot.
    user_data = (paths.out / "lab" / "nodes" / "s1" / "user-data").read_text()
    assert "crl.pem" in user_data


def test_publish_takes_a_name_on_new_hardware_only_after_cluster_replace(lab: tuple[Path, Paths]) -> None:
    path, paths = lab
    running = seedlib.ClusterSeed.from_dict(json.loads((paths.out / "lab" / "inventory.json").read_text()))
    ca = (paths.cluster_state("lab") / "ca.crt").read_text()
    cluster = inventory.load(path, state=paths.state)
    membership.retire(cluster, paths, "s2", S2, "cluster.replace", successor=NEW)
    membership.set_mac(path, S2, NEW)
    new = inventory.load(path, state=paths.state)
    refused = publish.refusals(running, new, ca, ca)
    assert refused == [f"s2 runs on {S2}; the inventory puts it on {NEW}: new hardware takes a node's place through "
                       f"./forge cluster.replace s2 --mac {NEW} (it retires the old machine's etcd member, monitor and "
                       "OSDs, and revokes its certificate)"]
    retired = frozenset(r.mac for r in revocation.read_revoked(paths.cluster_state("lab")).values())
    assert publish.refusals(running, new, ca, ca, retired=retired) == []


def test_remove_wants_the_node_out_of_the_inventory_first(lab: tuple[Path, Paths]) -> None:
    path, paths = lab
    with pytest.raises(UserError, match="s2 is still in .*lab.yaml") as info:
        membership.remove(inventory.load(path, state=paths.state), "s2", paths)
    assert "delete its entry (52:54:00:00:00:12) from the inventory first" in str(info.value)


def test_records_move_to_another_mac(tmp_path: Path) -> None:
    records = identity.Records(tmp_path / "nodes.json", {S2: identity.Record("s2", inventory.IPv4Address("10.0.0.12"))})
    moved = records.move(S2, NEW)
    assert moved.by_mac == {NEW: identity.Record("s2", inventory.IPv4Address("10.0.0.12"))}
    assert identity.Records.read(tmp_path).by_mac == moved.by_mac


# ---------------------------------------------------------------- etcd backups


def snap(node: str, stamp: str, at: float) -> backup.Snapshot:
    return backup.Snapshot(f"etcd-{node}-{stamp}.db", at, 40960)


@pytest.fixture
def core_ctx(rendered: Path) -> Ctx:
    seed = seedlib.Seed(seedlib.ClusterSeed.from_dict(json.loads((rendered / "inventory.json").read_text())),
                        seedlib.Identity("lab", "s1"))
    return Ctx(seed)


def test_a_snapshot_every_hour_the_newest_in_rbd(core_ctx: Ctx) -> None:
    now = 1_800_000_000.0
    none = backup.Facts((), "", "", now)
    assert [(s.name, s.why) for s in backup.plan(core_ctx, none)] == [("backup: etcd snapshot", "none yet")]  # type: ignore[union-attr]
    fresh = backup.Facts((snap("s1", "20270115T080000Z", now - 600),), "", "", now)
    assert [s.name for s in backup.plan(core_ctx, fresh)] == ["backup: copy the newest snapshot to RBD"]  # type: ignore[union-attr]
    copied = backup.Facts(fresh.snapshots, fresh.snapshots[-1].name, "", now)
    assert backup.plan(core_ctx, copied) == []
    assert "in RBD too" in backup.health(core_ctx, copied).reason
    # Its reason names when it was taken and stays the same as the minutes pass (no log line a minute).
    later = backup.Facts(copied.snapshots, copied.in_rbd, "", now + 300)
    assert backup.health(core_ctx, later) == backup.health(core_ctx, copied)
    assert "taken 2027-01-15 07:50 UTC" in backup.health(core_ctx, copied).reason
    waiting = backup.Facts(fresh.snapshots, "", "the rbd pool is not ready (0 of 32 placement groups active)", now)
    assert backup.plan(core_ctx, waiting) == []  # no copy while Ceph could not take it
    assert "not in RBD yet: the rbd pool is not ready" in backup.health(core_ctx, waiting).reason
    old = backup.Facts((snap("s1", "20270115T060000Z", now - 3700),), "etcd-s1-20270115T060000Z.db", "", now)
    assert [s.why for s in backup.plan(core_ctx, old)] == ["the newest is 62 minutes old"]  # type: ignore[union-attr]
    many = backup.Facts(tuple(snap("s1", f"20270115T08{m:02d}00Z", now - 60 * (30 - m)) for m in range(30)),
                        "etcd-s1-20270115T082900Z.db", "off", now)
    assert [(s.name, s.why) for s in backup.plan(core_ctx, many)] == [  # type: ignore[union-attr]
        ("backup: delete old snapshots", "6 beyond the newest 24")]
