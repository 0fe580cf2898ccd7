"""Stable node identity: a node (by MAC) keeps the name, address and keys it got first.

Each test renders for real into temporary directories (render.render with its own out/
and state/) and compares what matters to a running cluster: every node's name, address
and overlay address, and the certificate and keys state/<cluster>/nodes/<mac>/ holds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from clusterforge import cli, identity, inventory, render
from clusterforge.log import UserError
from clusterforge.paths import Paths

from .conftest import EXAMPLE, KEY

HEAD = f"""\
cluster: {{name: lab}}
network: {{NETWORK}}
access:
  ssh_authorized_keys: ["{KEY}"]
services: {{etcd: true, ceph: false, wireguard: true, slurm: true}}
nodes:
"""
FIRST_NODE_LINE = 7  # nodes[i] is on line 7 + i
NETWORK = "subnet: 10.0.0.0/24"


def node(mac: int, role: str, **pins: str) -> str:
    fields = "".join(f", {key}: {value}" for key, value in pins.items())
    return f'  - {{mac: "52:54:00:00:00:{mac:02x}", roles: [{role}]{fields}}}'


CORE = [node(0x11, "core"), node(0x12, "core"), node(0x13, "core")]
COMPUTE = [node(0x51, "compute"), node(0x52, "compute"), node(0x53, "compute"), node(0x54, "compute")]
SEVEN = CORE + COMPUTE


def mac(line: str) -> str:
    found = re.search(r'mac: "([^"]+)"', line)
    assert found
    return found.group(1)


@dataclass
class Lab:
    """One cluster's inventory file, out/ and state/, rendered as a user would."""

    root: Path

    @property
    def inventory(self) -> Path:
        return self.root / "lab.yaml"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def paths(self) -> Paths:
        return Paths(out=self.root / "out", state=self.state, runs=self.root / "runs")

    def write(self, nodes: list[str], network: str = NETWORK) -> Path:
        self.inventory.write_text(HEAD.replace("NETWORK", network) + "\n".join(nodes) + "\n")
        return self.inventory

    def load(self) -> inventory.Cluster:
        return inventory.load(self.inventory, state=self.state)

    def render(self, nodes: list[str] | None = None, network: str = NETWORK) -> str:
        """Render the nodes (or the inventory file as it is); the summary a user reads."""
        if nodes is not None:
            self.write(nodes, network)
        cluster = self.load()
        return cli.render_summary(cluster, render.render(cluster, self.root / "out", self.state))

    def refused(self, nodes: list[str]) -> str:
        """Render the nodes; the error (message and hint) that refuses them. Nothing is written."""
        self.write(nodes)
        before = self.state_files()
        with pytest.raises(UserError) as info:
            self.render()
        assert self.state_files() == before, "a refused render changed state/"
        return str(info.value)

    def identities(self) -> dict[str, tuple[str, str, str]]:
        """MAC -> (name, address, overlay address), as the inventory now resolves."""
        return {n.mac: (n.name, str(n.ip), str(n.overlay_ip)) for n in self.load().nodes}

    def keys(self) -> dict[str, dict[str, bytes]]:
        """MAC -> its certificate and keys in state/lab/nodes/<mac>/."""
        nodes = self.state / "lab" / "nodes"
        return {d.name.replace("-", ":"): {f.name: f.read_bytes() for f in sorted(d.iterdir())}
                for d in sorted(nodes.iterdir())} if nodes.exists() else {}

    def state_files(self) -> dict[str, bytes]:
        if not self.state.exists():
            return {}
        return {str(p.relative_to(self.state)): p.read_bytes() for p in sorted(self.state.rglob("*"))
                if p.is_file() and p.name != ".lock"}

    def records(self) -> dict[str, dict[str, str]]:
        return json.loads((self.state / "lab" / identity.RECORDS_FILE).read_text())["nodes"]


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return Lab(tmp_path)


def at(lab: Lab, index: int, field: str) -> str:
    """How an error names nodes[index]'s field: file:line: nodes[i].field."""
    return f"{lab.inventory}:{FIRST_NODE_LINE + index}: nodes[{index}].{field}"


def other(index: int, node_line: str) -> str:
    """How an error names the other node: nodes[i] (MAC, line N)."""
    return f"nodes[{index}] ({mac(node_line)}, line {FIRST_NODE_LINE + index})"


def new_nodes(summary: str) -> list[str]:
    return [line.split()[0] for line in summary.splitlines() if line.endswith("(new)")]


# ---------------------------------------------------------------- the example inventory

def example_nodes(text: str) -> tuple[str, list[str]]:
    """The example inventory split into its head and its node entries (each several lines)."""
    head, body = text.split("\nnodes:\n")
    entries = ["  - mac:" + entry for entry in body.split("  - mac:")[1:]]
    return head + "\nnodes:\n", entries


def test_reordering_the_example_changes_no_name_address_or_key(lab: Lab) -> None:
    head, entries = example_nodes(EXAMPLE.read_text())
    lab.inventory.write_text(head + "".join(entries))
    lab.render()
    names, keys = lab.identities(), lab.keys()
    assert [names[m][0] for m in sorted(names)] == ["s1", "s2", "s3"]

    for order in ([2, 0, 1], [2, 1, 0], [1, 2, 0]):
        lab.inventory.write_text(head + "".join(entries[i] for i in order))
        summary = lab.render()
        assert lab.identities() == names
        assert lab.keys() == keys
        assert "(new)" not in summary and "reissued" not in summary and "changed" not in summary


def test_inserting_a_node_at_the_top_of_the_example_renames_nobody(lab: Lab) -> None:
    head, entries = example_nodes(EXAMPLE.read_text())
    lab.inventory.write_text(head + "".join(entries))
    lab.render()
    names, keys = lab.identities(), lab.keys()

    newcomer = '  - mac: "52:54:00:00:00:10"\n    roles: [core, storage, compute]\n    disks: [/dev/vdb]\n'
    extra = '  - mac: "52:54:00:00:00:14"\n    roles: [core, storage, compute]\n    disks: [/dev/vdb]\n'
    lab.inventory.write_text(head + newcomer + extra + "".join(entries))
    summary = lab.render()
    now = lab.identities()
    assert {m: now[m] for m in names} == names
    assert {m: k for m, k in lab.keys().items() if m in keys} == keys
    assert now["52:54:00:00:00:10"] == ("s4", "10.0.0.14", "10.99.0.14")
    assert now["52:54:00:00:00:14"] == ("s5", "10.0.0.15", "10.99.0.15")
    assert new_nodes(summary) == ["s4", "s5"]
    assert "reissued" not in summary


def line_of(text: str, needle: str) -> int:
    return text[:text.index(needle)].count("\n") + 1


def test_a_pin_on_another_nodes_default_in_the_example_is_refused(lab: Lab) -> None:
    """First render: the third node pinned to the address the first one gets by default."""
    head, entries = example_nodes(EXAMPLE.read_text())
    entries[2] = entries[2].replace("    disks:", "    ip: 10.0.0.11\n    disks:")
    text = head + "".join(entries)
    lab.inventory.write_text(text)
    first_line, pin_line = line_of(text, '"52:54:00:00:00:11"'), line_of(text, "ip: 10.0.0.11")
    with pytest.raises(UserError) as info:
        lab.render()
    message = info.value.message
    assert message.startswith(f"{lab.inventory}:{pin_line}: nodes[2].ip: address 10.0.0.11"), message
    assert f"nodes[0] (52:54:00:00:00:11, line {first_line}) gets by default" in message
    assert not lab.state.exists()


# ---------------------------------------------------------------- seven nodes

def test_first_render_gives_defaults_and_marks_every_node_new(lab: Lab) -> None:
    summary = lab.render(SEVEN)
    assert lab.identities() == {
        "52:54:00:00:00:11": ("s1", "10.0.0.11", "10.99.0.11"),
        "52:54:00:00:00:12": ("s2", "10.0.0.12", "10.99.0.12"),
        "52:54:00:00:00:13": ("s3", "10.0.0.13", "10.99.0.13"),
        "52:54:00:00:00:51": ("c1", "10.0.0.51", "10.99.0.51"),
        "52:54:00:00:00:52": ("c2", "10.0.0.52", "10.99.0.52"),
        "52:54:00:00:00:53": ("c3", "10.0.0.53", "10.99.0.53"),
        "52:54:00:00:00:54": ("c4", "10.0.0.54", "10.99.0.54"),
    }
    assert new_nodes(summary) == ["s1", "s2", "s3", "c1", "c2", "c3", "c4"]
    assert lab.records()["52:54:00:00:00:51"] == {"name": "c1", "ip": "10.0.0.51"}
    # The same inventory again: nothing is new, nothing reissued, state/ untouched.
    before = lab.state_files()
    again = lab.render()
    assert new_nodes(again) == [] and "reissued" not in again
    assert lab.state_files() == before


def test_reversing_seven_nodes_changes_nothing(lab: Lab) -> None:
    lab.render(SEVEN)
    names, keys = lab.identities(), lab.keys()
    summary = lab.render(SEVEN[::-1])
    assert lab.identities() == names
    assert lab.keys() == keys
    assert new_nodes(summary) == [] and "reissued" not in summary


def test_a_compute_node_inserted_at_the_top(lab: Lab) -> None:
    lab.render(SEVEN)
    names, keys = lab.identities(), lab.keys()
    summary = lab.render([node(0x50, "compute"), *SEVEN])
    now = lab.identities()
    assert {m: now[m] for m in names} == names
    assert now["52:54:00:00:00:50"] == ("c5", "10.0.0.55", "10.99.0.55")
    assert {m: k for m, k in lab.keys().items() if m in keys} == keys
    assert new_nodes(summary) == ["c5"]


def test_a_compute_node_pinned_to_the_first_core_nodes_default_is_refused(lab: Lab) -> None:
    """First render, empty state: .11 is what the unpinned first core node gets by default."""
    nodes = [*CORE, node(0x50, "compute", ip="10.0.0.11"), *COMPUTE]
    message = lab.refused(nodes)
    assert message.startswith(at(lab, 3, "ip") + ": address 10.0.0.11 is what "), message
    assert f"{other(0, nodes[0])} gets by default" in message
    # Listed first, the pinned compute node is refused all the same.
    nodes = [node(0x50, "compute", ip="10.0.0.11"), *SEVEN]
    message = lab.refused(nodes)
    assert message.startswith(at(lab, 0, "ip") + ": address 10.0.0.11 is what "), message
    assert f"{other(1, nodes[1])} gets by default" in message
    assert not lab.state.exists()


def test_a_compute_node_pinned_to_a_core_address_later_is_refused(lab: Lab) -> None:
    """Later renders: .11 is kept by s1; .14 is what a core node added with it gets by default."""
    lab.render(SEVEN)
    names, keys = lab.identities(), lab.keys()
    nodes = [*SEVEN, node(0x50, "compute", ip="10.0.0.11")]
    message = lab.refused(nodes)
    assert message.startswith(at(lab, 7, "ip") + ": address 10.0.0.11 is "), message
    assert other(0, nodes[0]) in message and "kept since the cluster was first rendered" in message
    nodes = [node(0x50, "compute", ip="10.0.0.14"), *SEVEN, node(0x14, "core")]
    message = lab.refused(nodes)
    assert message.startswith(at(lab, 0, "ip") + ": address 10.0.0.14 is what "), message
    assert f"{other(8, nodes[8])} gets by default" in message
    lab.write(SEVEN)
    assert lab.identities() == names and lab.keys() == keys


def test_a_node_named_s1_is_refused_and_renames_nobody(lab: Lab) -> None:
    lab.render(SEVEN)
    names, keys = lab.identities(), lab.keys()
    for role in ("storage", "compute"):
        nodes = [*SEVEN, node(0x60, role, name="s1")]
        message = lab.refused(nodes)
        assert message.startswith(at(lab, 7, "name") + ": name 's1' is "), message
        assert other(0, nodes[0]) in message and "kept since the cluster was first rendered" in message
    lab.write(SEVEN)
    assert lab.identities() == names and lab.keys() == keys


@pytest.mark.parametrize("role", ["compute", "storage"])
def test_a_node_named_s1_on_a_first_render_is_refused(lab: Lab, role: str) -> None:
    """With an empty state: s1 is what the first core node gets by default."""
    nodes = [*SEVEN, node(0x60, role, name="s1")]
    message = lab.refused(nodes)
    assert message.startswith(at(lab, 7, "name") + ": name 's1' is what "), message
    assert other(0, nodes[0]) in message
    assert not lab.state.exists()


def test_a_pin_on_its_own_default_is_allowed_on_a_first_render(lab: Lab) -> None:
    """Nobody else would get it: the pinned node is the one the default goes to."""
    lab.render([node(0x11, "core", name="s1", ip="10.0.0.11"), *SEVEN[1:]])
    assert lab.identities()["52:54:00:00:00:11"] == ("s1", "10.0.0.11", "10.99.0.11")
    assert lab.identities()["52:54:00:00:00:12"] == ("s2", "10.0.0.12", "10.99.0.12")
    other_lab = Lab(lab.root / "other")
    other_lab.root.mkdir()
    other_lab.render([node(0x60, "storage", name="s1"), *SEVEN])
    assert other_lab.identities()["52:54:00:00:00:60"][0] == "s1"
    assert other_lab.identities()["52:54:00:00:00:11"][0] == "s2"


# ---------------------------------------------------------------- pins

def test_two_nodes_pinned_alike_are_refused_naming_both(lab: Lab) -> None:
    nodes = [node(0x11, "core", ip="10.0.0.40"), *SEVEN[1:6], node(0x54, "compute", ip="10.0.0.40")]
    message = lab.refused(nodes)
    assert message.startswith(at(lab, 0, "ip") + ": address 10.0.0.40 is pinned for "), message
    assert other(6, nodes[6]) in message
    nodes = [node(0x11, "core", name="head"), *SEVEN[1:6], node(0x54, "compute", name="head")]
    message = lab.refused(nodes)
    assert message.startswith(at(lab, 0, "name") + ": name 'head' is pinned for "), message
    assert other(6, nodes[6]) in message


def test_a_pin_on_another_nodes_kept_address_is_refused(lab: Lab) -> None:
    lab.render(SEVEN)
    names = lab.identities()
    nodes = [*SEVEN[:6], node(0x54, "compute", ip="10.0.0.52")]
    message = lab.refused(nodes)
    assert message.startswith(at(lab, 6, "ip") + ": address 10.0.0.52 is "), message
    assert other(4, nodes[4]) in message and "kept since the cluster was first rendered" in message
    lab.write(SEVEN)
    assert lab.identities() == names


def test_changing_a_nodes_own_pin_reissues_its_certificate(lab: Lab) -> None:
    lab.render(SEVEN)
    keys = lab.keys()
    s1, c1 = "52:54:00:00:00:11", "52:54:00:00:00:51"
    nodes = [node(0x11, "core", name="head"), *SEVEN[1:3], node(0x51, "compute", ip="10.0.0.60"), *SEVEN[4:]]
    summary = lab.render(nodes)
    now = lab.identities()
    assert now[s1] == ("head", "10.0.0.11", "10.99.0.11")
    assert now[c1] == ("c1", "10.0.0.60", "10.99.0.60")
    assert "changed: s1 renamed head" in summary
    assert "changed: c1: 10.0.0.51 -> 10.0.0.60" in summary
    assert "certificates reissued: head, c1 (these nodes need their new seed)" in summary
    assert new_nodes(summary) == []
    after = lab.keys()
    for m in (s1, c1):  # a new certificate for the same key pair; the WireGuard key stays
        assert after[m]["tls.crt"] != keys[m]["tls.crt"]
        assert after[m]["tls.key"] == keys[m]["tls.key"] and after[m]["wireguard.key"] == keys[m]["wireguard.key"]
    assert {m: k for m, k in after.items() if m not in (s1, c1)} == {m: k for m, k in keys.items() if m not in (s1, c1)}
    assert lab.records()[s1] == {"name": "head", "ip": "10.0.0.11"}

    # Kept from now on, pin or no pin; and nothing is reissued a second time.
    assert "reissued" not in lab.render(nodes)
    summary = lab.render([SEVEN[0].replace("core]", "core], name: head"), *SEVEN[1:]])
    assert lab.identities()[c1] == ("c1", "10.0.0.60", "10.99.0.60")
    assert "reissued" not in summary and "changed" not in summary


def test_a_pin_on_the_gateway_or_vip_is_refused(lab: Lab) -> None:
    message = lab.refused([node(0x11, "core", ip="10.0.0.1"), *SEVEN[1:]])
    assert message.startswith(at(lab, 0, "ip") + ": 10.0.0.1 is the gateway's address"), message
    message = lab.refused([node(0x11, "core", ip="10.0.0.254"), *SEVEN[1:]])
    assert message.startswith(at(lab, 0, "ip") + ": 10.0.0.254 is the VIP"), message


# ---------------------------------------------------------------- removed nodes and state.forget

def test_a_removed_nodes_record_is_kept_and_listed(lab: Lab) -> None:
    lab.render(SEVEN)
    names, keys = lab.identities(), lab.keys()
    s2 = "52:54:00:00:00:12"
    without = [line for line in SEVEN if mac(line) != s2] + [node(0x14, "core")]
    summary = lab.render(without)
    now = lab.identities()
    assert {m: now[m] for m in now if m in names} == {m: names[m] for m in names if m != s2}
    assert {m: k for m, k in lab.keys().items() if m in keys} == keys  # s2's keys are kept too
    # The newcomer does not take the absent node's name or address.
    assert now["52:54:00:00:00:14"] == ("s4", "10.0.0.14", "10.99.0.14")
    assert (f"kept in state, not in the inventory: {s2} (s2, 10.0.0.12); release with ./forge state.forget MAC"
            in summary)
    # Pinning the absent node's name or address is refused, pointing at state.forget.
    for pin, what in ((dict(name="s2"), "name 's2'"), (dict(ip="10.0.0.12"), "address 10.0.0.12")):
        message = lab.refused([*without[:-1], node(0x14, "core", **pin)])
        assert message.startswith(at(lab, 6, next(iter(pin))) + f": {what} belongs to {s2}"), message
    # Back in the inventory, the node is as it was.
    lab.render(SEVEN)
    assert {m: v for m, v in lab.identities().items() if m in names} == names


def test_state_forget_releases_an_absent_mac(lab: Lab) -> None:
    lab.render(SEVEN)
    c2 = "52:54:00:00:00:52"
    nodes = [line for line in SEVEN if mac(line) != c2]
    lab.render(nodes)
    assert (lab.state / "lab/nodes/52-54-00-00-00-52").is_dir()

    # A MAC of the inventory, or one state/ does not know, is refused; nothing changes.
    before = lab.state_files()
    with pytest.raises(UserError, match="52:54:00:00:00:11 is node s1 of the inventory"):
        cli.forget(str(lab.inventory), "52:54:00:00:00:11", lab.paths)
    with pytest.raises(UserError, match="keeps nothing for 52:54:00:00:00:99") as info:
        cli.forget(str(lab.inventory), "52-54-00-00-00-99", lab.paths)
    assert info.value.hint == f"it keeps these MACs that left the inventory: {c2}"
    with pytest.raises(UserError) as info:
        cli.forget(str(lab.inventory), "52:54:00:00:00", lab.paths)
    assert info.value.message == "'52:54:00:00:00' is not a MAC address"
    assert lab.state_files() == before

    # Any spelling of the MAC; its record and keys are gone; its name can be given again.
    assert cli.forget(str(lab.inventory), "5254.0000.0052", lab.paths) == (
        "released c2 (10.0.0.52), kept for 52:54:00:00:00:52; its keys are deleted and its certificate revoked "
        "(the next cluster.publish tells a running cluster)")
    assert c2 not in lab.records()
    revoked = json.loads((lab.state / "lab/revoked.json").read_text())["revoked"]
    assert [(r["node"], r["mac"], r["why"]) for r in revoked.values()] == [("c2", "52:54:00:00:00:52", "state.forget")]
    assert not (lab.state / "lab/nodes/52-54-00-00-00-52").exists()
    with pytest.raises(UserError, match="keeps nothing for 52:54:00:00:00:52"):
        cli.forget(str(lab.inventory), c2, lab.paths)
    summary = lab.render([*nodes, node(0x55, "compute", name="c2", ip="10.0.0.52")])
    assert lab.identities()["52:54:00:00:00:55"] == ("c2", "10.0.0.52", "10.99.0.52")
    assert "kept in state" not in summary and new_nodes(summary) == ["c2"]


def test_state_forget_with_a_fresh_state_creates_nothing(lab: Lab) -> None:
    lab.write(SEVEN)
    with pytest.raises(UserError, match="keeps nothing for 52:54:00:00:00:99"):
        cli.forget(str(lab.inventory), "52:54:00:00:00:99", lab.paths)
    assert not lab.state.exists()


def test_state_forget_works_while_a_pin_collides_with_the_record(lab: Lab) -> None:
    """The way out the refusal's hint names must not be refused by the same collision."""
    lab.render(SEVEN)
    typo, fixed = "52:54:00:00:00:11", node(0x10, "core", name="s1", ip="10.0.0.11")
    nodes = [fixed, *SEVEN[1:]]
    message = lab.refused(nodes)
    assert f"name 's1' belongs to {typo}" in message
    assert f"hint: if that machine is gone: ./forge state.forget {typo}" in message
    assert cli.forget(str(lab.inventory), typo, lab.paths).startswith("released s1 (10.0.0.11)")
    lab.render(nodes)
    assert lab.identities()["52:54:00:00:00:10"] == ("s1", "10.0.0.11", "10.99.0.11")


# ---------------------------------------------------------------- changed networks and damaged records

def test_addresses_outside_a_changed_subnet_are_given_anew(lab: Lab) -> None:
    lab.render(SEVEN)
    names = lab.identities()
    summary = lab.render(SEVEN, network="subnet: 10.1.0.0/24")
    now = lab.identities()
    assert {m: v[0] for m, v in now.items()} == {m: v[0] for m, v in names.items()}  # names stay
    assert now["52:54:00:00:00:11"] == ("s1", "10.1.0.11", "10.99.0.11")
    assert now["52:54:00:00:00:54"] == ("c4", "10.1.0.54", "10.99.0.54")
    assert "changed: s1: 10.0.0.11 -> 10.1.0.11" in summary
    assert "certificates reissued: s1, s2, s3, c1, c2, c3, c4" in summary
    assert lab.records()["52:54:00:00:00:11"] == {"name": "s1", "ip": "10.1.0.11"}


def test_a_larger_subnet_keeps_every_address(lab: Lab) -> None:
    """Though the default ranges scale with the subnet (core nodes from 10.0.0.23 in a /23)."""
    lab.render(SEVEN, network="subnet: 10.0.0.0/24, overlay: 10.98.0.0/23")
    names, keys = lab.identities(), lab.keys()
    summary = lab.render(SEVEN, network="subnet: 10.0.0.0/23, overlay: 10.98.0.0/23")
    assert lab.identities() == names and lab.keys() == keys
    assert "changed" not in summary and "reissued" not in summary


def test_a_recorded_address_that_became_the_vip_or_gateway_is_given_anew(lab: Lab) -> None:
    lab.render(SEVEN)
    names = lab.identities()
    summary = lab.render(SEVEN, network="subnet: 10.0.0.0/24, vip: 10.0.0.52, gateway: 10.0.0.53")
    now = lab.identities()
    assert now["52:54:00:00:00:52"] == ("c2", "10.0.0.55", "10.99.0.55")
    assert now["52:54:00:00:00:53"] == ("c3", "10.0.0.56", "10.99.0.56")
    assert {m: v for m, v in now.items() if m not in ("52:54:00:00:00:52", "52:54:00:00:00:53")} == {
        m: v for m, v in names.items() if m not in ("52:54:00:00:00:52", "52:54:00:00:00:53")}
    assert "changed: c2: 10.0.0.52 -> 10.0.0.55" in summary and "changed: c3: 10.0.0.53 -> 10.0.0.56" in summary
    assert "certificates reissued: c2, c3 " in summary


def test_a_hand_edited_record_is_an_error_not_a_guess(lab: Lab) -> None:
    lab.render(SEVEN)
    path = lab.state / "lab" / identity.RECORDS_FILE
    data = json.loads(path.read_text())
    data["nodes"]["52:54:00:00:00:12"]["name"] = "s1"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match="name s1 is recorded for nodes"):
        lab.load()
    path.write_text("{not json")
    with pytest.raises(UserError, match="nodes.json: unreadable"):
        lab.load()
