"""The agent's Ceph (issue 14): ceph.conf and the keyrings it writes, read back by Ceph's own
tools (ceph-conf, ceph-authtool); the disk rules on real block devices (loop devices: blank,
a filesystem, a partition table, LVM, mounted, held open), and what the plan does with each;
a monitor restarted when a forwarded cluster-log message is stuck on it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterforge.node import seed as seedlib
from clusterforge.node.agent import ceph, host, osd
from clusterforge.node.agent.context import Ctx

from .conftest import EXAMPLE, FIXED_STATE
from .seeds import seeds_on_disk

ONE_STORAGE_HOST = EXAMPLE.read_text().replace(
    '  - mac: "52:54:00:00:00:12"\n    roles: [core, storage, compute]\n    disks: [/dev/vdb]',
    '  - mac: "52:54:00:00:00:12"\n    roles: [core, compute]').replace(
    '  - mac: "52:54:00:00:00:13"\n    roles: [core, storage, compute]\n    disks: [/dev/vdb]',
    '  - mac: "52:54:00:00:00:13"\n    roles: [core, compute]')


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> dict[str, seedlib.Seed]:
    return seeds_on_disk(EXAMPLE.read_text(), tmp_path_factory.mktemp("lab"))


def conf_value(conf: Path, key: str, section: str = "mon.s1") -> str:
    proc = subprocess.run(["ceph-conf", "-c", str(conf), "-n", section, "--lookup", key], capture_output=True,
                          text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


# ---------------------------------------------------------------- configuration and keyrings


def test_ceph_conf_for_three_storage_hosts(lab: dict[str, seedlib.Seed], tmp_path: Path) -> None:
    conf = tmp_path / "ceph.conf"
    conf.write_text(ceph.ceph_conf(Ctx(lab["s1"])))
    assert conf_value(conf, "fsid") == lab["s1"].cluster.ceph_fsid
    assert conf_value(conf, "mon_initial_members") == "s1, s2, s3"
    assert conf_value(conf, "mon_host") == ",".join(f"[v2:10.0.0.{i}:3300,v1:10.0.0.{i}:6789]" for i in (11, 12, 13))
    assert conf_value(conf, "public_network") == "10.0.0.0/24"
    assert conf_value(conf, "osd_pool_default_size") == "3"
    assert conf_value(conf, "osd_pool_default_min_size") == "2"
    assert conf_value(conf, "osd_crush_chooseleaf_type") == "1"
    assert conf_value(conf, "auth_allow_insecure_global_id_reclaim") == "false"
    assert conf_value(conf, "mon_allow_pool_size_one") == ""  # left at Ceph's default
    assert conf_value(conf, "osd_memory_target", section="osd.0") == str(1024**3)
    assert conf_value(conf, "osd_memory_target") == ""  # the OSDs' setting only
    assert conf_value(conf, "mon_warn_on_slow_ping_time") == ""  # Ceph's 1 s on metal and under KVM
    conf.write_text(ceph.ceph_conf(Ctx(lab["s1"]), emulated=True))
    assert conf_value(conf, "mon_warn_on_slow_ping_time") == "5000"  # under TCG the CPU delays heartbeats


def test_ceph_conf_for_one_storage_host(tmp_path: Path) -> None:
    seeds = seeds_on_disk(ONE_STORAGE_HOST, tmp_path)
    conf = tmp_path / "ceph.conf"
    conf.write_text(ceph.ceph_conf(Ctx(seeds["s2"])))
    assert conf_value(conf, "osd_pool_default_size") == "1"
    assert conf_value(conf, "osd_pool_default_min_size") == "1"
    assert conf_value(conf, "osd_crush_chooseleaf_type") == "0"
    assert conf_value(conf, "mon_allow_pool_size_one") == "true"


def authtool(path: Path) -> str:
    return subprocess.run(["ceph-authtool", "-l", str(path)], capture_output=True, text=True, check=True).stdout


def test_keyrings_hold_the_seed_keys_with_their_caps(lab: dict[str, seedlib.Seed], tmp_path: Path) -> None:
    ctx = Ctx(lab["s1"])
    state = FIXED_STATE / "lab"
    key = {entity: (state / "ceph" / f"{entity.rstrip('.')}.key").read_text().strip()
           for entity in ("mon.", "client.admin", "client.bootstrap-osd")}
    mgr_key = (state / "nodes" / "52-54-00-00-00-11" / "ceph-mgr.key").read_text().strip()
    first = tmp_path / "mon.keyring"
    first.write_text(ceph.mon_keyring(ctx) + ceph.bootstrap_entities(ctx))
    listed = authtool(first)
    for entity, caps in (("mon.", ['caps mon = "allow *"']),
                         ("client.admin", ['caps mgr = "allow *"', 'caps mon = "allow *"', 'caps osd = "allow *"']),
                         ("client.bootstrap-osd", ['caps mgr = "allow r"', 'caps mon = "profile bootstrap-osd"'])):
        block = listed.split(f"[{entity}]", 1)[1].split("\n[", 1)[0]
        assert f"key = {key[entity]}" in block
        assert all(cap in block for cap in caps), (entity, block)
    assert f"[mgr.s1]\n\tkey = {mgr_key}" in listed and 'caps mon = "allow profile mgr"' in listed
    # What the node's own tools read: the admin keyring, the OSD bootstrap key, the manager's.
    for name, text, entity in (("admin", ceph.admin_keyring(ctx), "client.admin"),
                               ("bootstrap", ceph.bootstrap_osd_keyring(ctx), "client.bootstrap-osd"),
                               ("mgr", ceph.mgr_keyring(ctx), "mgr.s1")):
        (tmp_path / name).write_text(text)
        assert f"[{entity}]" in authtool(tmp_path / name)


# ---------------------------------------------------------------- the disk rules, on loop devices


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root")


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[str]:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 * 1024**2)
    device = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True,
                            check=True).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run(["umount", device], capture_output=True)
        subprocess.run(["losetup", "-d", device], capture_output=True)


def disk_facts(device: str, wipe: bool, path: str = "/dev/vdc") -> osd.Facts:
    """A listed disk as osd.facts() sees it, probed for real."""
    found = osd.Disk(path=path, device=device, wipe=wipe, holds=osd.contents(device), busy=osd.in_use(device),
                     osd=None, osd_running=False, job=host.Unit("job", "inactive", "dead", "static", ""), job_log=())
    return osd.Facts((found,), True, "")


def storage_ctx(lab: dict[str, seedlib.Seed]) -> Ctx:
    return Ctx(lab["s3"])


@needs_root
def test_a_blank_disk_becomes_an_osd(lab: dict[str, seedlib.Seed], disk: str) -> None:
    f = disk_facts(disk, wipe=False)
    assert f.disks[0].holds == () and f.disks[0].busy == ""
    assert [s.name for s in osd.plan(storage_ctx(lab), f)] == ["osd: create an OSD on /dev/vdc"]  # type: ignore[union-attr]


@needs_root
@pytest.mark.parametrize(("make", "holds"), [
    (["mkfs.ext4", "-q", "-F"], "an ext4 filesystem"),
    (["sgdisk", "-o"], "a gpt partition table"),
    (["pvcreate", "-q", "-ff", "-y"], "LVM"),
])
def test_a_disk_that_holds_something_is_left_alone_unless_wipe_allows(lab: dict[str, seedlib.Seed], disk: str,
                                                                      make: list[str], holds: str) -> None:
    subprocess.run([*make, disk], capture_output=True, check=True)
    kept = disk_facts(disk, wipe=False)
    assert holds in kept.disks[0].holds
    assert osd.plan(storage_ctx(lab), kept) == []
    status = osd.health(storage_ctx(lab), kept)
    assert status.state == "degraded"
    assert f"s3 /dev/vdc: has {holds}" in status.reason and "not used; set wipe: true" in status.reason
    wiped = disk_facts(disk, wipe=True)
    assert [s.name for s in osd.plan(storage_ctx(lab), wiped)] == ["osd: erase /dev/vdc"]  # type: ignore[union-attr]
    if "LVM" in holds:
        subprocess.run(["pvremove", "-q", "-ff", "-y", disk], capture_output=True)


@needs_root
def test_a_mounted_disk_is_never_erased(lab: dict[str, seedlib.Seed], disk: str, tmp_path: Path) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", disk], check=True)
    (tmp_path / "mnt").mkdir()
    subprocess.run(["mount", disk, str(tmp_path / "mnt")], check=True)
    f = disk_facts(disk, wipe=True)
    assert f.disks[0].busy == f"mounted at {tmp_path / 'mnt'}"
    assert osd.plan(storage_ctx(lab), f) == []
    assert "never erased while in use" in osd.health(storage_ctx(lab), f).reason


@needs_root
def test_a_disk_held_open_is_never_erased(lab: dict[str, seedlib.Seed], disk: str) -> None:
    holder = subprocess.Popen([sys.executable, "-c", f"import os, time; os.open({disk!r}, os.O_RDONLY | os.O_EXCL); "
                                                     "print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        f = disk_facts(disk, wipe=True)
        assert f.disks[0].busy == "held by another process"
        assert osd.plan(storage_ctx(lab), f) == []
    finally:
        holder.kill()
        holder.wait()


def test_a_path_that_is_no_disk_is_refused(lab: dict[str, seedlib.Seed], tmp_path: Path) -> None:
    plain = tmp_path / "not-a-disk"
    plain.write_bytes(b"\0" * 4096)
    assert osd.in_use(str(plain)) == "not a block device"
    missing = osd.Facts((osd.Disk("/dev/disk/by-id/gone", "", False, (), "", None, False,
                                  host.Unit("job", "", "", "", ""), ()),), True, "")
    assert osd.plan(storage_ctx(lab), missing) == []
    assert osd.health(storage_ctx(lab), missing).reason == "s3 /dev/disk/by-id/gone: no such disk"


# ---------------------------------------------------------------- a stuck monitor


def test_slow_ops_of_another_monitor_are_not_looked_into() -> None:
    status = {"health": {"checks": {"SLOW_OPS": {"summary": {"message": "1 slow ops, mon.s10 has slow ops"}}}}}
    assert ceph.stuck_log("s1", status) == 0.0  # mon.s10 is not mon.s1: its admin socket is not asked
    assert ceph.stuck_log("s1", {"health": {"checks": {}}}) == 0.0


def converged(ctx: Ctx, stuck_log: float = 0.0) -> ceph.Facts:
    me = ctx.me.name
    running = {u: host.Unit(u, "active", "running", "enabled", "success")
               for u in (*ceph.TARGETS, f"ceph-mon@{me}.service", f"ceph-mgr@{me}.service")}
    status = {"health": {"status": "HEALTH_OK", "checks": {}}, "quorum_names": ["s1", "s2", "s3"],
              "osdmap": {"num_osds": 3, "num_up_osds": 3, "num_in_osds": 3}}
    pools = ({"pool_name": "rbd", "size": 3, "application_metadata": {"rbd": {}}},)
    return ceph.Facts(conf=ceph.ceph_conf(ctx), admin_keyring_ok=True, bootstrap_keyring_ok=True, mon_made=True,
                      mgr_keyring_ok=True, units=running, status=status, status_why="", pools=pools,
                      stuck_log=stuck_log)


def test_a_monitor_holding_a_lost_cluster_log_message_is_restarted(lab: dict[str, seedlib.Seed]) -> None:
    ctx = Ctx(lab["s1"])
    assert ceph.plan(ctx, converged(ctx)) == []
    assert ceph.plan(ctx, converged(ctx, stuck_log=ceph.STUCK_LOG_SECONDS - 1)) == []  # it may still be answered
    plan = ceph.plan(ctx, converged(ctx, stuck_log=600))
    assert [(s.name, s.why) for s in plan] == [  # type: ignore[union-attr]
        ("ceph: restart my monitor", "a cluster-log message it forwarded has waited 600 s for the leader (lost in "
                                     "an election: a slow op until it restarts)")]
