"""The inventory model: defaults, normalisation, and one malformed inventory per rule."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest

from clusterforge import inventory
from clusterforge.inventory import BootMode, Role
from clusterforge.log import UserError

from .conftest import KEY, write_inventory

HEAD = f"""
cluster:
  name: lab
network:
  subnet: 10.0.0.0/24
access:
  ssh_authorized_keys: ["{KEY}"]
services: {{etcd: true, ceph: false, wireguard: true, slurm: false}}
nodes:
"""  # services at line 7, nodes at 8; a node appended after a blank line is at line 10


def make_bundle(folder: Path, version: bytes = b"v1.30.4+k3s1") -> None:
    """A bundle that passes the static checks: an x86-64 ELF (a copy of /bin/true, never run as
    K3s) that carries a K3s version string, and an images tarball. No real K3s can be had here."""
    folder.mkdir()
    (folder / "k3s").write_bytes(Path("/bin/true").read_bytes() + b"\0" + version + b"\0")
    (folder / "k3s-airgap-images-amd64.tar.zst").write_bytes(b"(images)")


def load_text(tmp_path: Path, text: str) -> inventory.Cluster:
    return inventory.load(write_inventory(tmp_path, text))


def assert_error(tmp_path: Path, text: str, where: str, fragment: str) -> UserError:
    """Loading fails with a message naming file:line: field and saying what is wrong."""
    path = write_inventory(tmp_path, text)
    with pytest.raises(UserError) as info:
        inventory.load(path)
    message = info.value.message
    assert message.startswith(f"{path}:{where}"), message
    assert fragment in message, message
    return info.value


def test_example_resolves_defaults(example: inventory.Cluster) -> None:
    assert example.name == "lab" and example.domain == "lab.internal"
    assert [n.name for n in example.nodes] == ["s1", "s2", "s3"]
    assert [str(n.ip) for n in example.nodes] == ["10.0.0.11", "10.0.0.12", "10.0.0.13"]
    assert [str(n.overlay_ip) for n in example.nodes] == ["10.99.0.11", "10.99.0.12", "10.99.0.13"]
    assert all(n.roles == (Role.CORE, Role.STORAGE, Role.COMPUTE) for n in example.nodes)
    assert example.network.boot_server == IPv4Address("10.0.0.2")


def test_defaults_by_role_and_first_free(tmp_path: Path) -> None:
    cluster = load_text(tmp_path, HEAD + """
  - {mac: "52:54:00:00:00:01", role: core}
  - {mac: "52-54-00-00-00-02", roles: [compute]}
  - {mac: "5254.0000.0003", roles: [frontend]}
  - {mac: "52:54:00:00:00:04", roles: [compute], name: gpu1, ip: 10.0.0.60}
  - {mac: "525400000005", roles: [compute]}
  - {mac: "52:54:00:00:00:06", roles: [core], ip: 10.0.0.20}
  - {mac: "52:54:00:00:00:07", roles: [core]}
""")
    got = [(n.name, str(n.ip), n.mac) for n in cluster.nodes]
    assert got == [
        ("s1", "10.0.0.11", "52:54:00:00:00:01"),
        ("c1", "10.0.0.51", "52:54:00:00:00:02"),
        ("f1", "10.0.0.91", "52:54:00:00:00:03"),
        ("gpu1", "10.0.0.60", "52:54:00:00:00:04"),
        ("c2", "10.0.0.52", "52:54:00:00:00:05"),
        ("s2", "10.0.0.20", "52:54:00:00:00:06"),
        ("s3", "10.0.0.12", "52:54:00:00:00:07"),
    ]
    assert cluster.network.gateway == IPv4Address("10.0.0.1")
    assert cluster.network.vip == IPv4Address("10.0.0.254")
    assert cluster.network.dns == (IPv4Address("10.0.0.1"),)
    assert cluster.nodes[0].boot is BootMode.INSTALL


def test_upper_case_mac_and_diskless(tmp_path: Path) -> None:
    cluster = load_text(tmp_path, HEAD + """
  - {mac: "AA-BB-CC-DD-EE-F0", role: core, boot: diskless}
""")
    assert cluster.nodes[0].mac == "aa:bb:cc:dd:ee:f0"
    assert cluster.nodes[0].mac_hyphen == "aa-bb-cc-dd-ee-f0"
    assert cluster.nodes[0].boot is BootMode.DISKLESS


def test_yaml_syntax_error(tmp_path: Path) -> None:
    assert_error(tmp_path, "cluster:\n  name: [lab\nnetwork: {}\n", "3", "YAML syntax error")


def test_duplicate_key(tmp_path: Path) -> None:
    assert_error(tmp_path, "cluster:\n  name: a\n  name: b\n", "3", "duplicate key 'name'")


def test_empty_file(tmp_path: Path) -> None:
    assert_error(tmp_path, "\n", "1", "empty")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        inventory.load(tmp_path / "nope.yaml")


def test_unknown_key_with_did_you_mean(tmp_path: Path) -> None:
    error = assert_error(tmp_path, HEAD.replace("  subnet:", "  subnett:"), "4: network.subnett",
                         "unknown key 'subnett'")
    assert error.hint == "did you mean 'subnet'?"


def test_unknown_node_key(tmp_path: Path) -> None:
    error = assert_error(tmp_path, HEAD + """
  - mac: "52:54:00:00:00:01"
    rolse: [core]
""", "11: nodes[0].rolse", "unknown key")
    assert error.hint is not None and "'roles'" in error.hint


def test_wrong_type(tmp_path: Path) -> None:
    assert_error(tmp_path, HEAD.replace("etcd: true", "etcd: maybe") + """
  - {mac: "52:54:00:00:00:01", role: core}
""", "7: services.etcd", "expected true or false, got a string ('maybe')")


def test_wrong_type_nodes_not_list(tmp_path: Path) -> None:
    assert_error(tmp_path, HEAD + "  mac: 1\n", "8: nodes", "expected a list, got a mapping")


def test_missing_required(tmp_path: Path) -> None:
    assert_error(tmp_path, HEAD.replace("  name: lab\n", "  domain: x.y\n") + """
  - {mac: "52:54:00:00:00:01", role: core}
""", "1: cluster", "missing required key 'name'")


def test_bad_mac(tmp_path: Path) -> None:
    assert_error(tmp_path, HEAD + """
  - {mac: "52:54:00:00:00", role: core}
""", "10: nodes[0].mac", "'52:54:00:00:00' is not a MAC address")


def test_multicast_mac(tmp_path: Path) -> None:
    assert_error(tmp_path, HEAD + """
  - {mac: "01:00:5e:00:00:01", role: core}
""", "10: nodes[0].mac", "multicast")


def test_duplicate_mac_in_other_spelling(tmp_path: Path) -> None:
    assert_error(tmp_path, HEAD + """
  - {mac: "52:54:00:00:00:01", role: core}
  - {mac: "52-54-00-00-00-01", role: compute}
""", "11: nodes[1].mac", "used twice (first at line 10)")


def test_duplicate_name(tmp_path: Path) -> None:
    assert_error(tmp_path, HEAD + """
  - {mac: "52:54:00:00:00:01", role: core, name: a}
  - {mac: "52:54:00:00:00:02", role: compute, name: a}
""", "10: nodes[0].name", "name 'a' is pinned for nodes[1] (52:54:00:00:00:02, line 11) too")


@pytest.mark.parametrize("name", ["-a", "a_b", "A1", "x" * 64, "a.b"])
def test_invalid_hostname(tmp_path: Path, name: str) -> None:
    assert_error(tmp_path, HEAD + f"""
  - {{mac: "52:54:00:00:00:01", role: core, name: "{name}"}}
""", "10: nodes[0].name", "is not a valid hostname")


def test_duplicate_ip(tmp_path: Path) -> None:
    assert_error(tmp_path, HEAD + """
  - {mac: "52:54:00:00:00:01", role: core, ip: 10.0.0.40}
  - {mac: "52:54:00:00:00:02", role: compute, ip: 10.0.0.40}
""", "10: nodes[0].ip", "address 10.0.0.40 is pinned for nodes[1] (52:54:00:00:00:02, line 11) too")


@pytest.mark.parametrize(("ip", "fragment"), [
    ("10.0.1.5", "outside the subnet"),
    ("10.0.0.0", "network address"),
    ("10.0.0.255", "broadcast address"),
    ("10.0.0.1", "the gateway's address"),
    ("10.0.0.254", "is the VIP"),
    ("10.0.0.300", "is not an IPv4 address"),
])
def test_bad_node_ip(tmp_path: Path, ip: str, fragment: str) -> None:
    head = HEAD.replace("  subnet: 10.0.0.0/24", "  subnet: 10.0.0.0/24\n  boot_server: 10.0.0.5")
    assert_error(tmp_path, head + f"""
  - {{mac: "52:54:00:00:00:01", role: core, ip: {ip}}}
""", "11: nodes[0].ip", fragment)


def test_node_ip_is_boot_server(tmp_path: Path) -> None:
    head = HEAD.replace("  subnet: 10.0.0.0/24", "  subnet: 10.0.0.0/24\n  boot_server: 10.0.0.5")
    assert_error(tmp_path, head + """
  - {mac: "52:54:00:00:00:01", role: core, ip: 10.0.0.5}
""", "5: network.boot_server", "already used by the gateway, VIP or a node")


def test_bad_subnet(tmp_path: Path) -> None:
    assert_error(tmp_path, HEAD.replace("10.0.0.0/24", "10.0.0.1/24") + """
  - {mac: "52:54:00:00:00:01", role: core}
""", "4: network.subnet", "is not an IPv4 network")


def test_gateway_outside_subnet(tmp_path: Path) -> None:
    text = HEAD.replace("  subnet: 10.0.0.0/24\n", "  subnet: 10.0.0.0/24\n  gateway: 10.1.0.1\n")
    assert_error(tmp_path, text + """
  - {mac: "52:54:00:00:00:01", role: core}
""", "5: network.gateway", "outside the subnet")


def test_overlay_overlaps_subnet(tmp_path: Path) -> None:
    text = HEAD.replace("  subnet: 10.0.0.0/24\n", "  subnet: 10.0.0.0/24\n  overlay: 10.0.0.0/16\n")
    assert_error(tmp_path, text + """
  - {mac: "52:54:00:00:00:01", role: core}
""", "5: network.overlay", "overlaps the subnet")


def test_role_range_exhausted(tmp_path: Path) -> None:
    nodes = "".join(f'  - {{mac: "52:54:00:00:01:{i:02x}", roles: [frontend]}}\n'
                    for i in range(10))
    assert_error(tmp_path, HEAD + "  - {mac: \"52:54:00:00:00:01\", role: core}\n" + nodes,
                 "19: nodes[10]", "no free address left for a 'frontend' node")


def test_role_range_outside_small_subnet(tmp_path: Path) -> None:
    assert_error(tmp_path, HEAD.replace("10.0.0.0/24", "10.0.0.0/26") + """
  - {mac: "52:54:00:00:00:01", role: core}
  - {mac: "52:54:00:00:00:02", role: frontend}
""", "11: nodes[1]", "no free address left")


def test_unknown_role(tmp_path: Path) -> None:
    assert_error(tmp_path, HEAD + """
  - {mac: "52:54:00:00:00:01", roles: [core, gpu]}
""", "10: nodes[0].roles[1]", "'gpu' is not one of: core, storage, compute, frontend")


def test_role_and_roles(tmp_path: Path) -> None:
    assert_error(tmp_path, HEAD + """
  - {mac: "52:54:00:00:00:01", role: core, roles: [core]}
""", "10: nodes[0].role", "either 'role' or 'roles'")


@pytest.mark.parametrize("cores", [0, 2])
def test_etcd_needs_odd_core_count(tmp_path: Path, cores: int) -> None:
    nodes = "".join(f'  - {{mac: "52:54:00:00:00:0{i}", roles: [core]}}\n' for i in range(cores))
    nodes += '  - {mac: "52:54:00:00:00:09", roles: [frontend]}\n'
    assert_error(tmp_path, HEAD + nodes, "7: services.etcd",
                 f"odd number of core nodes, the inventory has {cores}")


def test_ceph_without_disks(tmp_path: Path) -> None:
    assert_error(tmp_path, HEAD.replace("ceph: false", "ceph: true") + """
  - {mac: "52:54:00:00:00:01", roles: [core, storage]}
""", "7: services.ceph", "no storage node lists a data disk")


def test_disks_on_non_storage_node(tmp_path: Path) -> None:
    assert_error(tmp_path, HEAD + """
  - {mac: "52:54:00:00:00:01", roles: [core], disks: [/dev/vdb]}
""", "10: nodes[0].disks", "only storage nodes")


def test_bad_disk_path(tmp_path: Path) -> None:
    assert_error(tmp_path, HEAD + """
  - {mac: "52:54:00:00:00:01", roles: [core, storage], disks: [vdb]}
""", "10: nodes[0].disks[0]", "not a device path")


def test_slurm_without_compute(tmp_path: Path) -> None:
    assert_error(tmp_path, HEAD.replace("slurm: false", "slurm: true") + """
  - {mac: "52:54:00:00:00:01", roles: [core]}
""", "7: services.slurm", "no node has the compute role")


def test_k3s_without_bundle(tmp_path: Path) -> None:
    assert_error(tmp_path, HEAD.replace("slurm: false", "slurm: false, k3s: true") + """
  - {mac: "52:54:00:00:00:01", roles: [core]}
""", "7: services.k3s", "k3s_bundle is not set")


def test_k3s_bundle_missing(tmp_path: Path) -> None:
    text = HEAD.replace("slurm: false", "slurm: false, k3s: true, k3s_bundle: nope.tar")
    assert_error(tmp_path, text + """
  - {mac: "52:54:00:00:00:01", roles: [core]}
""", "7: services.k3s_bundle", "K3s bundle not found")


def test_k3s_bundle_present(tmp_path: Path) -> None:
    make_bundle(tmp_path / "k3s-bundle")
    text = HEAD.replace("slurm: false", "slurm: false, k3s: true, k3s_bundle: k3s-bundle")
    cluster = load_text(tmp_path, text + '  - {mac: "52:54:00:00:00:01", roles: [core]}\n')
    assert cluster.services.k3s_bundle == tmp_path / "k3s-bundle"


def test_no_ssh_key(tmp_path: Path) -> None:
    assert_error(tmp_path, HEAD.replace(f'["{KEY}"]', "[]") + """
  - {mac: "52:54:00:00:00:01", role: core}
""", "6: access.ssh_authorized_keys", "at least one SSH public key")


def test_bad_ssh_key(tmp_path: Path) -> None:
    assert_error(tmp_path, HEAD.replace(f'["{KEY}"]', '["hello"]') + """
  - {mac: "52:54:00:00:00:01", role: core}
""", "6: access.ssh_authorized_keys[0]", "not an SSH public key")


def test_bad_cluster_name_and_os(tmp_path: Path) -> None:
    assert_error(tmp_path, HEAD.replace("name: lab", "name: Lab_1"), "2: cluster.name",
                 "not a valid cluster name")
    assert_error(tmp_path, HEAD.replace("name: lab", "name: lab\n  os: arch"), "3: cluster.os",
                 "'arch' is not one of: debian-12, ubuntu-24.04")
    assert_error(tmp_path, HEAD.replace("name: lab", "name: images"), "2: cluster.name",
                 "reserved")


def test_bad_timezone(tmp_path: Path) -> None:
    assert_error(tmp_path, HEAD.replace("name: lab", "name: lab\n  timezone: Mars/Olympus"),
                 "3: cluster.timezone", "not a known time zone")


def test_no_nodes(tmp_path: Path) -> None:
    assert_error(tmp_path, HEAD + "  []\n", "8: nodes", "at least one node")
