"""The example cluster, formed by its agents from power-on with no step by hand, checked from
inside the nodes with each service's own client. One booted cluster for every test here
(the `formed` fixture); the tests that break something run last, in the order written."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from clusterforge.run import CommandError
from clusterforge.verify import faults
from clusterforge.verify.checks import Probe
from clusterforge.verify.faults import until
from clusterforge.vm.cluster import ClusterVMs

from .conftest import FORMED_RUNS, REPO, figure, forge, keep_logs, on_formed, sh

DEADLINE = 600  # seconds for the cluster to heal after a fault, under TCG



def names(vms: ClusterVMs) -> list[str]:
    return [n.name for n in vms.cluster.nodes]


# ---------------------------------------------------------------- what `./forge demo` verified


REPORT = Path("dist/vmlab/report")


def test_demo_verified_every_service(formed: ClusterVMs) -> None:
    """The demo's `verify` checked each service with its own client (etcdctl, chronyc, wg and
    pings, the VIP, check-cluster and the health API, ceph -s and an RBD write read back on
    another node, sinfo and srun as root and as the operator): every check passed, K3s is
    skipped for want of a bundle."""
    report = json.loads((REPO / REPORT / "report.json").read_text())
    results = {c["name"]: c for c in report["checks"]}
    failed = {n: c["reason"] for n, c in results.items() if c["status"] == "fail"}
    assert not failed, failed
    assert report["verdict"] == "pass"
    assert {c["service"] for c in report["checks"] if c["status"] == "pass"} >= {
        "etcd", "time", "wireguard", "vip", "health", "ceph", "slurm"}
    k3s = next(c for c in report["checks"] if c["service"] == "k3s")
    assert k3s["status"] == "skipped" and "not verified: no bundle" in k3s["reason"]
    lanes = report["timeline"]
    assert set(lanes) == set(names(formed))
    assert all({"power-on", "kernel", "multi-user", "etcd healthy"} <= set(ev) for ev in lanes.values()), lanes


def test_report_page_renders_offline_in_a_browser(formed: ClusterVMs) -> None:
    """report.html in headless Chromium: it renders, the timeline is there, no console error,
    and nothing is fetched from anywhere else."""
    page = REPO / REPORT / "report.html"
    assert "<script" not in page.read_text() and "http" not in page.read_text().split("<body>")[0]
    shot = formed.dir / "report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={formed.dir / 'chromium'}", "--enable-logging=stderr", "--v=0",
             "--window-size=1280,1400"]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "timeline (seconds after power-on)" in dom.stdout and 'class="lane"' in dom.stdout
    assert all(f"<b>{n}</b>" in dom.stdout for n in names(formed))
    assert not [line for line in dom.stderr.splitlines() if "CONSOLE" in line and "ERROR" in line.upper()]
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120,
                   check=True)
    assert shot.stat().st_size > 10_000


def test_each_node_is_what_its_seed_says(formed: ClusterVMs) -> None:
    """The generic qcow2 with each node's seed ISO (BIOS): its name, identity, key modes and the
    operator's keys come from the seed; the stock etcd unit never runs (the agent's does)."""
    key = formed.cluster.ssh_authorized_keys[0].split()[1]
    for node in formed.cluster.nodes:
        assert sh(formed, node.name, "hostname -f").strip() == f"{node.name}.{formed.cluster.domain}"
        assert f'"node": "{node.name}"' in sh(formed, node.name, "cat /etc/clusterforge/identity.json")
        assert sh(formed, node.name, "stat -c %a /etc/clusterforge/pki/node.key").strip() == "600"
        assert key in sh(formed, node.name, "cat /home/forge/.ssh/authorized_keys")
        assert sh(formed, node.name, "systemctl is-active etcd", check=False).strip() == "inactive"


def test_etcd_has_no_plaintext_listener(formed: ClusterVMs) -> None:
    listening = sh(formed, "s2", "ss -Hltn 'sport = :2379 or sport = :2380'")
    assert sorted(line.split()[3] for line in listening.splitlines()) == sorted(
        ["10.0.0.12:2379", "127.0.0.1:2379", "10.0.0.12:2380"])
    # Plain HTTP to the client port gets no answer; HTTPS without a client certificate is refused.
    plain = sh(formed, "s1", "curl -s -m 10 http://10.0.0.12:2379/health; echo rc=$?", check=False)
    assert '"health"' not in plain and "rc=0" not in plain
    nocert = sh(formed, "s1", "curl -s -m 10 --cacert /etc/clusterforge/pki/ca.crt "
                              "https://10.0.0.12:2379/health; echo rc=$?", check=False)
    assert '"health"' not in nocert


# ---------------------------------------------------------------- mesh, VIP, health


def vip_holders(vms: ClusterVMs, nodes: list[str] | None = None) -> list[str]:
    vip = str(vms.cluster.network.vip)
    held = []
    for node in nodes or names(vms):
        if f" {vip}/" in sh(vms, node, "ip -4 -o addr show"):
            held.append(node)
    return held


def test_secrets_stay_out_of_logs_argv_and_health(formed: ClusterVMs) -> None:
    for node in names(formed):
        secrets = sh(formed, node, "for f in /etc/clusterforge/secrets/*.key /etc/clusterforge/secrets/k3s-token; do "
                                   "[ -f $f ] && [ $f != /etc/clusterforge/secrets/munge.key ] && cat $f; done; "
                                   "sed -n 2p /etc/clusterforge/pki/node.key", check=False).split()
        seen = sh(formed, node, "journalctl --no-pager -o cat; ps -eo args; cat /run/clusterforge/health.json; "
                                "curl -s -m 10 http://127.0.0.1/api/health; etcdctl get --prefix /clusterforge/")
        assert len(secrets) >= 4
        for secret in secrets:
            assert secret not in seen, f"a secret of {node} shows in its logs, argv, health record or etcd"


# ---------------------------------------------------------------- Ceph


def ceph_status(vms: ClusterVMs, node: str = "s1") -> dict:  # type: ignore[type-arg]
    return json.loads(sh(vms, node, "ceph -s -f json"))  # type: ignore[no-any-return]


def test_a_disk_that_holds_a_filesystem_is_left_alone_and_reported(formed: ClusterVMs) -> None:
    # Untouched: the file is still there.
    assert "clusterforge must not erase this" in sh(
        formed, "s3", "mkdir -p /mnt/k && mount -o ro /dev/vdc /mnt/k && cat /mnt/k/keep-me.txt; umount /mnt/k")
    record = json.loads(sh(formed, "s3", "cat /run/clusterforge/health.json"))
    osd = record["services"]["osd"]
    assert osd["state"] == "degraded" and "/dev/vdc: has an ext4 filesystem; not used; set wipe: true" in osd["reason"]
    table = sh(formed, "s1", "check-cluster", check=False)
    assert "s3 /dev/vdc: has an ext4 filesystem" in table


# ---------------------------------------------------------------- SLURM and K3s


def test_k3s_not_verified_without_a_bundle(formed: ClusterVMs) -> None:
    import pytest

    assert not formed.cluster.services.k3s
    pytest.skip("K3s: not verified: no bundle (none can be had on these machines; see README)")


# ---------------------------------------------------------------- faults, last


# CI's hour has no room for it (the cluster forms in 20-25 minutes on CI's machines).
@pytest.mark.all_only
def test_a_reset_nic_brings_its_node_back(formed: ClusterVMs) -> None:
    """What the agent does when a transmit queue hangs (nic.py), done by hand on s3: its NIC
    unbound and bound again, the node answers on its address again and the cluster is healthy."""
    ip = str(formed.cluster.node("s3").ip)
    boot = sh(formed, "s3", "cat /proc/sys/kernel/random/boot_id")
    code = f"from clusterforge.node.agent import nic; print(nic.reset(nic.lan_interface('{ip}'), '{ip}'))"
    # In a unit of its own: the SSH session that starts it goes down with the NIC.
    sh(formed, "s3", f'systemd-run --unit=cf-nic-reset --on-active=2 python3 -c "{code}"')

    def done() -> bool:
        try:
            return "Deactivated successfully" in sh(formed, "s3", "journalctl -u cf-nic-reset -o cat --no-pager",
                                                    check=False, timeout=30)
        except CommandError:
            return False  # s3 not answering yet

    until("the reset done on s3", done, seconds=300)
    assert sh(formed, "s3", "cat /proc/sys/kernel/random/boot_id") == boot  # the same boot: only the NIC reset
    until("check-cluster OK after the reset", lambda: formed.ssh(formed.cluster.node("s1")).run(
        "check-cluster", check=False).returncode == 0, seconds=DEADLINE)


# CI's hour has no room for it: a wiped member on the controller's node moves the controller too
# (run 17: 2-10 minutes more under TCG; the cluster forms in 20-27 minutes on CI's machines).
@pytest.mark.all_only
def test_a_wiped_etcd_member_rejoins_by_itself(formed: ClusterVMs) -> None:
    sh(formed, "s3", "systemctl stop clusterforge-agent clusterforge-etcd && rm -rf /var/lib/clusterforge/etcd "
                     "&& systemctl start clusterforge-agent")
    until("s3 back in etcd", lambda: len(re.findall(
        r" is healthy", sh(formed, "s1", "etcdctl endpoint health --cluster 2>&1", check=False))) == 3,
          seconds=DEADLINE)
    assert "remove my old member" in sh(formed, "s3", "journalctl -u clusterforge-agent -o cat --no-pager")
    # What comes next starts from a healthy cluster.
    until("check-cluster OK on s3 again", lambda: formed.ssh(formed.cluster.node("s3")).run(
        "check-cluster", check=False).returncode == 0, seconds=DEADLINE)


# In CI's hour the cluster is cut off once, by fault 1's power-off; the partition runs with --all
# (fault 2 of `verify --faults` cuts a node off too, and checks for split brain).
@pytest.mark.all_only
def test_partitioned_vip_holder_drops_it_and_another_takes_it(formed: ClusterVMs) -> None:
    holder = vip_holders(formed)[0]
    others = [n for n in names(formed) if n != holder]
    vip = str(formed.cluster.network.vip)
    machine = formed.machine(formed.cluster.node(holder))
    try:
        cut = time.monotonic()
        forge(*on_formed("cluster.partition", holder))
        moved = until("the VIP on another core node", lambda: vip_holders(formed, others), seconds=300, every=1)
        failover = time.monotonic() - cut
        figure(f"VIP failover after a partition: {failover:.0f}s ({holder} -> {moved[0]})")
        assert len(moved) == 1
        # The cut-off node, looked at through the guest agent, drops the VIP too.
        until(f"{holder} drops the VIP", lambda: f" {vip}/" not in machine.guest.run(
            ["ip", "-4", "-o", "addr", "show"]).stdout, seconds=300, every=3)
    finally:
        forge(*on_formed("cluster.heal", holder))
    until("one VIP holder after healing", lambda: len(vip_holders(formed)) == 1 and
             formed.ssh(formed.cluster.node(holder)).run("check-cluster", check=False).returncode == 0,
          seconds=DEADLINE)
    assert len(vip_holders(formed)) == 1


def test_fault_1_power_off_the_slurm_controller(formed: ClusterVMs) -> None:
    """`verify --faults`'s first fault, on the shared cluster: the core node running slurmctld is
    powered off with a batch job running elsewhere; etcd keeps quorum, the VIP is on one live
    core node, Ceph reads and writes, another controller takes over, the job completes and a new
    one runs; the node is started again and the cluster is fully healthy with no action."""
    result = faults.fault_power_off(formed, Probe(formed))
    figure(f"fault 1: SLURM controller failover {result.extra['failover_seconds']}s; {result.extra['node']} off "
           f"{result.extra['off_seconds']}s, fully healthy {result.extra['recovery_seconds']}s after its power-on")
    assert result.status == "pass", result.reason


@pytest.mark.all_only
def test_a_rebooted_storage_node_comes_back_with_no_action(formed: ClusterVMs) -> None:
    boot = sh(formed, "s2", "cat /proc/sys/kernel/random/boot_id")
    sh(formed, "s2", "systemctl reboot", check=False)
    until("s2 rebooted", lambda: sh(formed, "s2", "cat /proc/sys/kernel/random/boot_id", check=False,
                                       timeout=30) not in ("", boot), seconds=DEADLINE)
    until("HEALTH_OK after the reboot",
             lambda: ceph_status(formed)["health"]["status"] == "HEALTH_OK" and
             ceph_status(formed)["osdmap"]["num_up_osds"] == 3,
          seconds=DEADLINE)


@pytest.mark.all_only
@pytest.mark.parametrize("fault", [2, 3, 4])
def test_faults_2_to_4(formed: ClusterVMs, fault: int) -> None:
    """`verify --faults` 2-4 on the shared cluster: a node cut off, every node paused 60 s, every
    node power-cycled at once; each back to fully healthy with no action (./forge test --all)."""
    result = faults.run_faults(formed, which=(fault,))[0]
    figure(f"{result.name}: {result.reason}")
    assert result.status == "pass", result.reason + "\n" + result.evidence


def test_cluster_commands_as_typed(formed: ClusterVMs) -> None:
    """The README's cluster.* commands, typed as a user types them, on the shared cluster; last."""
    status = forge(*on_formed("cluster.status")).stdout
    assert [line.split()[2] for line in status.splitlines()] == ["running"] * 3, status
    assert forge(*on_formed("cluster.ssh", "s2", "hostname")).stdout.strip() == "s2"
    assert forge(*on_formed("cluster.ssh", "s3", "--", "cat", "/etc/hostname")).stdout.strip() == "s3"
    forge(*on_formed("cluster.pause"))
    assert {line.split()[2] for line in forge(*on_formed("cluster.status")).stdout.splitlines()} == {"paused"}
    forge(*on_formed("cluster.resume"))
    assert {line.split()[2] for line in forge(*on_formed("cluster.status")).stdout.splitlines()} == {"running"}
    keep_logs(formed, FORMED_RUNS / "logs")
    forge(*on_formed("cluster.down", "--timeout", "20"))  # then killed: no need to wait here
    left = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    assert str(FORMED_RUNS) not in left and not formed.net.exists()
    forge(*on_formed("cluster.destroy"))
    assert not formed.dir.exists()
