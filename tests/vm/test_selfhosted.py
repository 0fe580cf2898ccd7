"""The cluster serves its own PXE (issue 19), on the formed example cluster (qemu/lab.yaml, the
`formed` fixture): `./forge cluster.publish` as a user types it, a new machine that installs
from the core nodes, an unknown one that is discovered, refusals, the DHCP role moving when its
holder goes. One long test, in the order a person would do it; run by `./forge test --all`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clusterforge import inventory
from clusterforge.paths import Paths
from clusterforge.verify.faults import until
from clusterforge.vm.cluster import ClusterVMs
from clusterforge.vm.machine import Machine, MachineSpec, Nic

from .conftest import FORMED_INVENTORY, FORMED_RUNS, NEW, collect_logs, forge, service_starts, sh

STRANGER = "52:54:00:00:02:99"  # a machine nobody put in the inventory
DEADLINE = 900  # seconds for the cluster to take something in, under TCG



def core(vms: ClusterVMs) -> list[str]:
    return [n.name for n in vms.cluster.with_role(inventory.Role.CORE)]


def dnsmasq_on(vms: ClusterVMs, nodes: list[str]) -> list[str]:
    """The core nodes running the cluster's DHCP server."""
    return [n for n in nodes
            if sh(vms, n, "systemctl is-active clusterforge-dnsmasq.service", check=False).strip() == "active"]


def pxe_status(vms: ClusterVMs, node: str) -> dict:  # type: ignore[type-arg]
    return json.loads(sh(vms, node, "cat /run/clusterforge/health.json"))["services"].get("pxe", {})  # type: ignore[no-any-return]


def args(inventory_path: Path) -> list[str]:
    """A cluster.* command's options for the shared cluster, with this inventory."""
    return ["--inventory", str(inventory_path), "--runs", str(FORMED_RUNS)]


@pytest.mark.all_only
def test_the_cluster_serves_its_own_pxe(formed: ClusterVMs, grown: Path, rundir: Path) -> None:
    cores = core(formed)
    before = {n: pxe_status(formed, n) for n in cores}
    assert all(s.get("state") == "off" and "nothing published yet" in s.get("reason", "") for s in before.values()), \
        before
    assert dnsmasq_on(formed, cores) == []

    # Publish: every core node gets everything; its cluster.json lists the new node.
    first = forge("cluster.publish", *args(grown), timeout=3600)
    print(f"\n{first.stdout}")
    for node in cores:
        assert f"{node}: sent " in first.stdout, first.stdout
        assert NEW in sh(formed, node, "cat /etc/clusterforge/cluster.json")
        assert sh(formed, node, "test -f /var/lib/clusterforge/pxe/images/clusterforge-debian-12.raw.gz && "
                                "stat -c %a /var/lib/clusterforge/pxe/vmlab/nodes/c1/user-data").strip() == "600"
    again = forge("cluster.publish", *args(grown), timeout=600)
    assert again.stdout.startswith("nothing changed, nothing sent"), again.stdout

    # Served: HTTP on every core node, DHCP on exactly one, named in each record.
    holder = until("one core node serving DHCP", lambda: (lambda on: on[0] if len(on) == 1 else None)(
        dnsmasq_on(formed, cores)), seconds=DEADLINE)
    until("pxe ok on every core node", lambda: all(
        pxe_status(formed, n).get("state") == "ok" and pxe_status(formed, n).get("dhcp") == holder for n in cores),
          seconds=DEADLINE)
    vip = formed.cluster.network.vip
    boot = sh(formed, cores[-1], f"curl -sf -m 10 http://{vip}:8080/vmlab/pxe/boot.ipxe")
    assert f"set base http://{vip}:8080" in boot
    for node in cores:  # each keeps its own copy
        assert sh(formed, node, "curl -sf -m 10 -o /dev/null -w '%{http_code}' "
                                f"http://{formed.cluster.node(node).ip}:8080/vmlab/pxe/menu.ipxe") == "200"

    # Refused, nothing changed: another subnet; a running node renamed; a core node more.
    manifest = sh(formed, cores[0], "sha256sum /var/lib/clusterforge/pxe/manifest.json /etc/clusterforge/cluster.json")
    # (A wider subnet takes a wider overlay too: the inventory itself refuses a smaller one.)
    for changes, reason in (((("subnet: 10.0.0.0/24", "subnet: 10.0.0.0/23"),
                              ("overlay: 10.99.0.0/24", "overlay: 10.99.0.0/23")), "another subnet"),
                            ((('mac: "52:54:00:00:00:12"', 'mac: "52:54:00:00:00:12"\n    name: t2'),), "runs as s2"),
                            (((f'mac: "{NEW}"\n    roles: [compute]',  # five core nodes: etcd takes an odd number
                               f'mac: "{NEW}"\n    roles: [core]\n  - mac: "52:54:00:00:00:52"\n    roles: [core]'),),
                             "the core nodes change")):
        refused = grown.with_name(f"refused-{reason.split()[-1]}.yaml")
        text = grown.read_text()
        for change in changes:
            assert change[0] in text, change
            text = text.replace(*change)
        refused.write_text(text)
        proc = forge("cluster.publish", *args(refused), check=False, timeout=600)
        assert proc.returncode == 1 and reason in proc.stderr and "nothing was rendered or sent" in proc.stderr, \
            proc.stderr
    assert sh(formed, cores[0], "sha256sum /var/lib/clusterforge/pxe/manifest.json "
                                "/etc/clusterforge/cluster.json") == manifest

    # New hardware: an empty disk, the network first; it installs from the core nodes, boots its disk.
    before = service_starts(formed, cores)
    started = forge("cluster.start", "c1", *args(grown), timeout=3600, check=False)
    (formed.dir / "c1-start.txt").write_text(started.stdout + started.stderr)
    assert started.returncode == 0, f"{started.stdout[-3000:]}{started.stderr[-3000:]}\nlogs: {formed.dir}/c1/"
    vms = ClusterVMs(inventory.load(grown, state=Paths.resolve().state), formed.image,
                     Paths.resolve(runs=str(FORMED_RUNS)))
    assert sh(vms, "c1", "hostname").strip() == "c1"
    assert sh(vms, "c1", "findmnt -n -o SOURCE /").strip() == "/dev/vda3"
    journal = sh(formed, holder, "journalctl -u clusterforge-dnsmasq -o cat --no-pager")
    assert "DHCPACK" in journal and NEW in journal, journal[-2000:]
    installed = sh(formed, cores[0], "etcdctl get --print-value-only /clusterforge/pxe/installed/52-54-00-00-00-51")
    assert "its installer" in installed or "agent on c1" in installed, installed
    # Installed: its seed (its private keys) is no longer served, even to its own address.
    assert sh(vms, "c1", f"curl -s -m 10 -o /dev/null -w '%{{http_code}}' http://{vip}:8080/vmlab/nodes/c1/user-data",
              check=False) == "404"

    def c1_healthy() -> bool:
        view = json.loads(sh(formed, cores[0], "check-cluster --json", check=False) or "{}")
        return any(n["node"] == "c1" and n.get("healthy") for n in view.get("nodes", []))

    until("c1 in the cluster, healthy", c1_healthy, seconds=DEADLINE)
    # It joined: every core node's mesh has it, and no running service elsewhere restarted.
    for node in cores:
        assert "10.99.0.51/32" in sh(formed, node, "wg show wg0 allowed-ips")
    assert service_starts(formed, cores) == before

    # An unknown machine that network-boots is listed, ready to paste.
    formed.net.create(["stranger"])
    spec = MachineSpec(name="stranger", memory_mb=1024, nics=(Nic(STRANGER, formed.net.netdev("stranger"),
                                                                 bootindex=1),), netns=formed.net.netns)
    with Machine(spec, rundir):
        listed = until("the stranger listed", lambda: (lambda out: out if STRANGER in out else None)(
            forge("pxe.discovered", "--from-cluster", *args(grown), check=False).stdout), seconds=600, every=10)
    assert f'  - mac: "{STRANGER}"' in listed and "roles: [compute]" in listed
    assert NEW not in listed

    # The DHCP holder goes: another core node takes the role, and still only one serves.
    formed.kill(holder)
    others = [n for n in cores if n != holder]
    try:
        moved = until("DHCP on another core node", lambda: (lambda on: on[0] if len(on) == 1 else None)(
            dnsmasq_on(formed, others)), seconds=300, every=3)
        assert moved != holder
    finally:
        forge("cluster.start", holder, *args(FORMED_INVENTORY), timeout=1800)
    until("one DHCP server after the holder came back, the cluster healthy",
             lambda: len(dnsmasq_on(formed, cores)) == 1
             and formed.ssh(formed.cluster.node(holder)).run("check-cluster", check=False).returncode == 0,
          seconds=DEADLINE)
    collect_logs(vms)
