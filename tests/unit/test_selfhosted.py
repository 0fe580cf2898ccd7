"""The cluster serves its own PXE (issue 19): network.pxe, the one HTTP handler over the cluster's
stores in etcd (real etcd on loopback), the agent's plan on facts, the dnsmasq config it writes
(dnsmasq --test), cluster.publish's decisions on rendered trees and the node's side of a
publish, the never-run QEMU node, and the agent taking in a republished seed."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import subprocess
import sys
import tarfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from clusterforge import cli, inventory, publish, render
from clusterforge.log import UserError
from clusterforge.node import pxepublish, pxeserve
from clusterforge.node import seed as seedlib
from clusterforge.node.agent import core, host, pxe
from clusterforge.node.agent.context import Ctx
from clusterforge.node.agent.core import State, Wait
from clusterforge.node.agent.etcd_client import EtcdClient
from clusterforge.node.seed import PxeMode
from clusterforge.paths import Paths
from clusterforge.pxe.discovery import listing
from clusterforge.run import CommandError
from clusterforge.ssh import Target

from .conftest import EXAMPLE, FIXED_STATE, REPO, write_inventory
from .etcd_cluster import EtcdCluster, free_ports
from .loopback import get, serving, status

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
C1, C2 = "52:54:00:00:00:51", "52:54:00:00:00:52"
# The example and two machines that come later: a compute node that installs, one diskless.
GROWN = EXAMPLE.read_text() + (f'  - mac: "{C1}"\n    roles: [compute]\n'
                               f'  - mac: "{C2}"\n    roles: [compute]\n    boot: diskless\n')


def with_pxe(text: str, value: str) -> str:
    return text.replace("  overlay: 10.99.0.0/24    # WireGuard mesh",
                        f"  overlay: 10.99.0.0/24    # WireGuard mesh\n  pxe: {value}")


@dataclasses.dataclass
class Site:
    """A scratch repository of the factory's own: an inventory, state/ and what was rendered."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / "state"

    def load(self, text: str) -> inventory.Cluster:
        return inventory.load(write_inventory(self.root, text, f"inv-{uuid.uuid4().hex[:6]}.yaml"), state=self.state)

    def published(self, cluster: inventory.Cluster) -> Path:
        """Rendered as cluster.publish renders it: the iPXE scripts on the VIP."""
        site = render.Site(cluster.network.vip, inventory.HTTP_PORT)
        return render.render(cluster, self.root / "dist" / publish.PUBLISHED, self.state, site).path


@pytest.fixture
def site(tmp_path: Path) -> Site:
    shutil.copytree(FIXED_STATE, tmp_path / "state")
    return Site(tmp_path)


def images(root: Path, cluster: inventory.Cluster) -> Path:
    """Stand-ins for the image's netboot files and compressed image."""
    folder = root / "images"
    (folder / "netboot").mkdir(parents=True, exist_ok=True)
    for name in publish.NETBOOT_FILES:
        (folder / name).write_bytes(name.encode() * 100)
    (folder / f"{cluster.image_name}.raw.gz").write_bytes(b"image" * 1000)
    return folder


# ---------------------------------------------------------------- network.pxe


def test_network_pxe_defaults_to_dhcp(site: Site) -> None:
    cluster = site.load(EXAMPLE.read_text())
    assert cluster.network.pxe == PxeMode.DHCP
    assert json.loads((site.published(cluster) / "inventory.json").read_text())["network"]["pxe"] == "dhcp"


@pytest.mark.parametrize(("value", "mode"), [("dhcp", PxeMode.DHCP), ("proxy", PxeMode.PROXY), ("off", PxeMode.OFF),
                                              ('"off"', PxeMode.OFF)])
def test_network_pxe_modes(site: Site, value: str, mode: PxeMode) -> None:
    """`pxe: off` unquoted is what a user writes, and YAML 1.1 reads it as false: it means off."""
    cluster = site.load(with_pxe(EXAMPLE.read_text(), value))
    assert cluster.network.pxe == mode
    conf = (site.published(cluster) / "pxe" / "dnsmasq.conf").read_text()
    assert (",proxy," in conf) == (mode == PxeMode.PROXY)  # off: the factory's pxe.serve says its own mode


@pytest.mark.parametrize(("value", "message"), [("dchp", "'dchp' is not one of: dhcp, proxy, off"),
                                                ("true", "expected a string, got true or false")])
def test_network_pxe_refuses_other_values(site: Site, value: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        site.load(with_pxe(EXAMPLE.read_text(), value))
    assert "network.pxe" in info.value.message


def test_a_seed_without_network_pxe_reads_as_dhcp() -> None:
    doc = json.loads((REPO / "tests/unit/data/golden/lab/inventory.json").read_text())
    del doc["network"]["pxe"]
    assert seedlib.ClusterSeed.from_dict(doc).network.pxe == PxeMode.DHCP


def test_shipped_inventories() -> None:
    """The factory's PXE VM tests run their own server on qemu/pxe.yaml's network: its cluster
    serves none. The example and the VM suite's lab keep the default."""
    assert inventory.load(REPO / "qemu" / "pxe.yaml").network.pxe == PxeMode.OFF
    for path in (EXAMPLE, REPO / "qemu" / "lab.yaml"):
        assert "pxe:" not in path.read_text() and inventory.load(path).network.pxe == PxeMode.DHCP


def test_pxe_serve_mode_defaults_to_the_inventorys(site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_CWD", str(tmp_path))
    paths = Paths.resolve(str(tmp_path / "dist"), str(site.state), str(tmp_path / "runs"))
    for value, mode in (("proxy", "proxy"), ("off", "dhcp"), ("dhcp", "dhcp")):
        path = write_inventory(tmp_path, with_pxe(EXAMPLE.read_text(), value), f"{value}.yaml")
        assert cli.pxe_server(str(path), "br0", "", paths).mode == mode
        assert cli.pxe_server(str(path), "br0", "dhcp", paths).mode == "dhcp"  # --mode says otherwise


# ---------------------------------------------------------------- the node's side of a publish


def node_config(root: Path, seed_text: str, node: str = "s1") -> Path:
    """/etc/clusterforge of a core node: its seed's cluster.json, identity and CA."""
    config = root / "etc-clusterforge"
    (config / seedlib.PKI_DIR).mkdir(parents=True, exist_ok=True)
    (config / seedlib.CLUSTER_JSON).write_text(seed_text)
    (config / seedlib.IDENTITY_JSON).write_text(seedlib.Identity("lab", node).to_json())
    (config / seedlib.PKI_DIR / seedlib.CA_CERT).write_text((FIXED_STATE / "lab" / "ca.crt").read_text())
    return config


@dataclasses.dataclass(frozen=True)
class Publishing:
    """What cluster.publish decides to send a node, before it sends it."""

    files: dict[str, Path]
    manifest: pxepublish.Manifest
    core_seed: str
    change: publish.Change


def publishing(cluster: inventory.Cluster, rendered: Path, image_dir: Path | None, root: Path, config: Path,
               remote: publish.Remote | None = None) -> Publishing:
    files = publish.tree_files(cluster, rendered, image_dir)
    manifest = publish.manifest_of(files, publish.Hashes(root / "hashes.json"))
    core_seed = (rendered / "inventory.json").read_text()
    remote = remote or publish.Remote.parse("s1", json.dumps(pxepublish.state(root / "pxe", config)))
    return Publishing(files, manifest, core_seed, publish.decide(manifest, core_seed, remote, cluster.name))


def lay(cluster: inventory.Cluster, rendered: Path, image_dir: Path | None, root: Path, config: Path,
        remote: publish.Remote | None = None) -> tuple[pxepublish.Manifest, publish.Change, list[str]]:
    """Publish into a node's folders as cluster.publish does, through the tar the node reads."""
    plan = publishing(cluster, rendered, image_dir, root, config, remote)
    files, manifest, core_seed, change = plan.files, plan.manifest, plan.core_seed, plan.change
    stream = io.BytesIO()
    publish.write_tar(stream, cluster.name, manifest, change, files, core_seed)
    stream.seek(0)
    return manifest, change, pxepublish.receive(stream, root / "pxe", config)


class LocalNode(Target):
    """A "node" that is a command on this machine: argv() runs `code` with Python, not ssh."""

    def __init__(self, code: str):
        super().__init__("localhost", Path("/nonexistent"))
        object.__setattr__(self, "code", code)

    def argv(self, command: str, tty: bool = False) -> list[str]:
        return [sys.executable, "-c", self.code]  # type: ignore[attr-defined]


def test_send_streams_the_tar_to_the_node_and_says_why_it_failed(site: Site, tmp_path: Path) -> None:
    """publish.send itself: the tar through a process's stdin, as over SSH (a stdin written and
    closed by us must not break the wait for the node's answer)."""
    old = site.load(EXAMPLE.read_text())
    config = node_config(tmp_path, (site.published(old) / "inventory.json").read_text())
    grown = site.load(GROWN)
    rendered = site.published(grown)
    plan = publishing(grown, rendered, images(tmp_path, grown), tmp_path, config)
    files, manifest, core_seed, change = plan.files, plan.manifest, plan.core_seed, plan.change
    receiver = (f"import sys; from pathlib import Path; from clusterforge.node import pxepublish; "
                f"pxepublish.receive(sys.stdin.buffer, Path({str(tmp_path / 'pxe')!r}), Path({str(config)!r}))")
    publish.send(LocalNode(receiver), grown.name, manifest, change, files, core_seed)
    assert json.loads((tmp_path / "pxe/manifest.json").read_text()) == manifest
    assert (tmp_path / "pxe/lab/pxe/boot.ipxe").read_text() == (rendered / "pxe/boot.ipxe").read_text()

    refusing = "import sys; sys.stdin.buffer.read(100); print('disk full on s1'); sys.exit(3)"
    with pytest.raises(CommandError, match="disk full on s1"):
        publish.send(LocalNode(refusing), grown.name, manifest, change, files, core_seed)


def test_publish_is_taken_in_and_nothing_is_sent_twice(site: Site, tmp_path: Path) -> None:
    old = site.load(EXAMPLE.read_text())
    config = node_config(tmp_path, (site.published(old) / "inventory.json").read_text())
    grown = site.load(GROWN)
    rendered = site.published(grown)
    manifest, change, done = lay(grown, rendered, images(tmp_path, grown), tmp_path, config)
    root = tmp_path / "pxe"
    assert change.cluster_json and set(change.send) == set(manifest) and len(done) == len(manifest) + 1
    assert (root / "lab/pxe/boot.ipxe").read_text() == (rendered / "pxe/boot.ipxe").read_text()
    assert "set base http://10.0.0.254:8080" in (root / "lab/pxe/boot.ipxe").read_text()
    assert (root / "lab/nodes/c1/user-data").stat().st_mode & 0o777 == 0o600  # private keys
    assert (root / "lab/nodes/c1/meta-data").stat().st_mode & 0o777 == 0o644
    assert not (root / "lab/nodes/c1/seed.iso").exists()  # only what a netboot fetches
    assert (root / "images/clusterforge-debian-12.raw.gz").read_bytes() == b"image" * 1000
    assert json.loads((root / "manifest.json").read_text()) == manifest
    assert (config / "cluster.json").read_text() == (rendered / "inventory.json").read_text()
    assert not list(root.rglob(".*publish-*"))

    # Again: nothing differs, nothing is sent.
    again = publish.Remote.parse("s1", json.dumps(pxepublish.state(root, config)))
    assert publish.decide(manifest, (rendered / "inventory.json").read_text(), again, "lab").empty
    assert publish.describe(publish.Change((), (), False), manifest) == "up to date"

    # The diskless machine leaves: its files go, the rest stays.
    shrunk = site.load(GROWN.replace("    boot: diskless\n", "").replace(f'  - mac: "{C2}"\n    roles: [compute]\n',
                                                                     ""))
    _, change, _ = lay(shrunk, site.published(shrunk), tmp_path / "images", tmp_path, config)
    assert set(change.delete) == {f"lab/nodes/c2/{f}" for f in seedlib.NOCLOUD_FILES} | {
        "lab/pxe/mac/52-54-00-00-00-52.ipxe"}
    assert not (root / "lab/nodes/c2/user-data").exists() and (root / "lab/nodes/c1/user-data").exists()
    assert "lab/inventory.json" in change.send and "images/clusterforge-debian-12.raw.gz" not in change.send


def test_with_pxe_off_only_the_inventory_is_published(site: Site, tmp_path: Path) -> None:
    """Nothing would serve the scripts, seeds and image: the core nodes keep the inventory."""
    cluster = site.load(with_pxe(GROWN, "off"))
    assert list(publish.tree_files(cluster, site.published(cluster), images(tmp_path, cluster))) == [
        "lab/inventory.json"]


def tar_of(*members: tuple[str, bytes]) -> io.BytesIO:
    stream = io.BytesIO()
    with tarfile.open(fileobj=stream, mode="w") as tar:
        for name, data in members:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    stream.seek(0)
    return stream


def plan_of(manifest: dict[str, Any], delete: list[str] | None = None, cluster: str = "lab") -> tuple[str, bytes]:
    return pxepublish.PLAN, json.dumps({"cluster": cluster, "manifest": manifest, "delete": delete or []}).encode()


def entry(data: bytes, mode: str = "0644") -> dict[str, Any]:
    import hashlib

    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "mode": mode}


@pytest.mark.parametrize(("members", "message"), [
    ([plan_of({"lab/../../etc/passwd": entry(b"x")})], "not a file it can hold"),
    ([plan_of({"/etc/passwd": entry(b"x")})], "not a file it can hold"),
    ([plan_of({"other/x": entry(b"x")})], "not a file it can hold"),
    ([plan_of({"lab/x": entry(b"x", "4755")})], "not a file it can hold"),
    ([plan_of({}, delete=["lab/../x"])], "deletes a path outside"),
    ([("files/lab/x", b"x")], "does not start with its plan"),
    ([plan_of({"lab/x": entry(b"x")}), ("files/lab/y", b"y")], "not in the publish's manifest"),
    ([plan_of({"lab/x": entry(b"x")}), ("files/lab/x", b"not x")], "do not match the manifest"),
    ([plan_of({}), ("etc/shadow", b"x")], "has no place in a publish"),
    ([plan_of({}, cluster="other"), (pxepublish.CLUSTER_JSON, b"{}")], "seed schema None"),
])
def test_a_publish_the_node_cannot_take_leaves_nothing(tmp_path: Path, site: Site, members: list[tuple[str, bytes]],
                                                     message: str) -> None:
    config = node_config(tmp_path, (site.published(site.load(EXAMPLE.read_text())) / "inventory.json").read_text())
    before = (config / "cluster.json").read_text()
    with pytest.raises((pxepublish.PublishError, seedlib.SeedError), match=message):
        pxepublish.receive(tar_of(*members), tmp_path / "pxe", config)
    assert not (tmp_path / "pxe" / "manifest.json").exists()
    assert not [p for p in (tmp_path / "pxe").rglob("*") if p.is_file()] if (tmp_path / "pxe").exists() else True
    assert (config / "cluster.json").read_text() == before


def test_a_seed_for_another_cluster_is_refused(tmp_path: Path, site: Site) -> None:
    rendered = site.published(site.load(EXAMPLE.read_text()))
    config = node_config(tmp_path, (rendered / "inventory.json").read_text())
    other = (rendered / "inventory.json").read_text().replace('"name": "lab"', '"name": "other"')
    with pytest.raises(pxepublish.PublishError, match="for cluster lab, its seed for other"):
        pxepublish.receive(tar_of(plan_of({}), (pxepublish.CLUSTER_JSON, other.encode())), tmp_path / "pxe", config)
    nobody = (rendered / "inventory.json").read_text().replace('"name": "s1"', '"name": "s9"')
    with pytest.raises(seedlib.SeedError, match="names node 's1', which its cluster does not list"):
        pxepublish.receive(tar_of(plan_of({}), (pxepublish.CLUSTER_JSON, nobody.encode())), tmp_path / "pxe", config)


# ---------------------------------------------------------------- cluster.publish's decisions


def running_of(site: Site, text: str) -> seedlib.ClusterSeed:
    return seedlib.ClusterSeed.from_dict(json.loads((site.published(site.load(text)) / "inventory.json").read_text()))


def test_a_running_cluster_takes_new_and_removed_non_core_nodes(site: Site) -> None:
    running = running_of(site, EXAMPLE.read_text())
    ca = (site.state / "lab" / "ca.crt").read_text()
    assert publish.refusals(running, site.load(GROWN), ca, ca) == []
    grown = running_of(site, GROWN)
    # c1 and c2 leave again: only through cluster.remove, which names them.
    assert publish.refusals(grown, site.load(EXAMPLE.read_text()), ca, ca, removing=frozenset({"c1", "c2"})) == []
    left = publish.refusals(grown, site.load(EXAMPLE.read_text()), ca, ca)
    assert left == ["c1, c2 left the inventory, but the cluster runs them: ./forge cluster.remove c1 takes a node "
                    "out safely (drains SLURM, moves its data to the other storage nodes, revokes its certificate)"]
    assert publish.refusals(running, site.load(with_pxe(GROWN, "proxy")), ca, ca) == []


@pytest.mark.parametrize(("old", "new", "refusal"), [
    ("subnet: 10.0.0.0/24", "subnet: 10.1.0.0/24", "another subnet: 10.0.0.0/24 on the cluster, 10.1.0.0/24"),
    ("overlay: 10.99.0.0/24", "overlay: 10.98.0.0/24", "another overlay: 10.99.0.0/24 on the cluster, 10.98.0.0/24"),
    ("vip: 10.0.0.254", "vip: 10.0.0.250", "another VIP: 10.0.0.254 on the cluster, 10.0.0.250"),
    ("domain: lab.internal", "domain: lab.example", "another domain"),
    ("ceph: true", "ceph: false", "services turned on or off (ceph off)"),
    ('mac: "52:54:00:00:00:12"', 'mac: "52:54:00:00:00:12"\n    name: t2',
     "52:54:00:00:00:12 runs as s2 (10.0.0.12, overlay 10.99.0.12); the inventory makes it t2 (10.0.0.12"),
    ('mac: "52:54:00:00:00:13"', 'mac: "52:54:00:00:00:13"\n    ip: 10.0.0.33', "runs as s3 (10.0.0.13"),
    ("  - mac: \"52:54:00:00:00:12\"\n    roles: [core, storage, compute]\n    disks: [/dev/vdb]\n"
     "  - mac: \"52:54:00:00:00:13\"\n    roles: [core, storage, compute]\n    disks: [/dev/vdb]\n",
     "", "the core nodes change (removed: s2, s3)"),
    ("roles: [compute]\n    boot: diskless", "roles: [core]\n    boot: diskless\n  - mac: \"52:54:00:00:00:53\"\n"
     "    roles: [core]", "the core nodes change (added: c2, s4)"),
    ("name: lab", "name: lab2", "the nodes run cluster lab, the inventory is cluster lab2"),
])
def test_what_a_running_cluster_cannot_take_is_refused(site: Site, old: str, new: str, refusal: str) -> None:
    running = running_of(site, GROWN)
    text = GROWN.replace(old, new, 1)
    assert text != GROWN
    if "subnet" in old:  # every address moves with it
        text = text.replace("10.0.0.", "10.1.0.")
    ca = (site.state / "lab" / "ca.crt").read_text()
    found = publish.refusals(running, site.load(text), ca, ca)
    assert any(refusal in line for line in found), found


def test_a_cluster_trusting_another_ca_is_refused(site: Site) -> None:
    running = running_of(site, EXAMPLE.read_text())
    found = publish.refusals(running, site.load(EXAMPLE.read_text()), "-----BEGIN CERTIFICATE-----\nother\n",
                             (site.state / "lab" / "ca.crt").read_text())
    assert found == ["the cluster trusts another CA than the one in state/ (was it rendered with --rekey, or from "
                     "another state/?)"]


def test_what_each_node_is_sent(site: Site, tmp_path: Path) -> None:
    """A node that has the old publish gets the new nodes' files and what names them (the core
    nodes' seeds list every node); a node that missed everything (reinstalled, or down before)
    gets everything; the image is hashed once."""
    old = site.load(EXAMPLE.read_text())
    old_files = publish.tree_files(old, site.published(old), images(tmp_path, old))
    hashes = publish.Hashes(tmp_path / "h.json")
    old_manifest = publish.manifest_of(old_files, hashes)
    old_seed = (site.published(old) / "inventory.json").read_text()
    grown = site.load(GROWN)
    rendered = site.published(grown)
    manifest = publish.manifest_of(publish.tree_files(grown, rendered, tmp_path / "images"), hashes)
    seed = (rendered / "inventory.json").read_text()

    current = publish.decide(manifest, seed, publish.Remote("s1", old_manifest, old_seed, old_seed, None), "lab")
    assert set(current.send) == {
        "lab/inventory.json", "lab/pxe/dnsmasq.conf", "lab/pxe/mac/52-54-00-00-00-51.ipxe",
        "lab/pxe/mac/52-54-00-00-00-52.ipxe", *(f"lab/nodes/{n}/{f}" for n in ("c1", "c2")
                                                for f in seedlib.NOCLOUD_FILES),
        *(f"lab/nodes/{n}/user-data" for n in ("s1", "s2", "s3"))}
    assert current.cluster_json and not current.delete
    empty = publish.decide(manifest, seed, publish.Remote("s2", None, None, old_seed, None), "lab")
    assert set(empty.send) == set(manifest)
    assert publish.describe(current, manifest).startswith("sent 13 files (")
    assert publish.describe(current, manifest).endswith("and 5 more")
    assert hashes.changed  # and the next publish hashes nothing again
    hashes.save()
    again = publish.Hashes(tmp_path / "h.json")
    publish.manifest_of(publish.tree_files(grown, rendered, tmp_path / "images"), again)
    assert not again.changed


# ---------------------------------------------------------------- the agent's plan


@pytest.fixture
def published(site: Site) -> tuple[str, str]:
    """What a core node reads of a publish: the inventory and the dnsmasq.conf."""
    rendered = site.published(site.load(GROWN))
    return (rendered / "inventory.json").read_text(), (rendered / "pxe" / "dnsmasq.conf").read_text()


def ctx_for(seed_text: str, node: str, tmp_path: Path) -> Ctx:
    return Ctx(seedlib.parse(seed_text, seedlib.Identity("lab", node).to_json()), state_dir=tmp_path / "var",
               run_dir=tmp_path / "run")


UNIT_OFF = host.Unit(pxe.UNIT, "inactive", "dead", "static", "success")
UNIT_ON = host.Unit(pxe.UNIT, "active", "running", "static", "success")


def facts(**changes: Any) -> pxe.Facts:
    base = pxe.Facts(published=None, published_conf=None, config=None, unit=UNIT_OFF, interface="ens3", serving=True,
                     leader=False, holding=False, holder="", why="not campaigned yet", marked=True)
    return dataclasses.replace(base, **changes)


def names(plan: core.Plan) -> list[str]:
    assert not isinstance(plan, Wait), plan
    return [step.name for step in plan]


def test_nothing_published_nothing_served(published: tuple[str, str], tmp_path: Path) -> None:
    """Off, not waiting: a cluster formed without a publish is healthy (check-cluster and verify
    pass), and says how to start."""
    ctx = ctx_for(published[0], "s1", tmp_path)
    f = facts(serving=False)
    assert pxe.plan(ctx, f) == []
    status = pxe.health(ctx, f)
    assert status.state == State.OFF and status.reason == "nothing published yet (./forge cluster.publish)"


def test_the_holder_configures_and_starts_dnsmasq(published: tuple[str, str], tmp_path: Path) -> None:
    ctx = ctx_for(published[0], "s1", tmp_path)
    inv, conf = published
    assert names(pxe.plan(ctx, facts(published=inv, published_conf=conf, serving=False, leader=True))) == [
        "pxe: serve HTTP"]
    assert names(pxe.plan(ctx, facts(published=inv, published_conf=conf, leader=True))) == [
        "pxe: write dnsmasq's config"]
    wanted = pxe.dnsmasq_config(ctx, conf, "ens3")
    f = facts(published=inv, published_conf=conf, leader=True, config=wanted)
    assert names(pxe.plan(ctx, f)) == ["pxe: start dnsmasq"]
    converged = dataclasses.replace(f, unit=UNIT_ON)
    assert pxe.plan(ctx, converged) == []
    status = pxe.health(ctx, converged)
    assert (status.state, status.detail) == (State.OK, {"dhcp": "s1"})
    assert status.reason == "HTTP on port 8080; DHCP (dhcp) and TFTP on this node"
    # A republished inventory (a new node's lease): the config is written again, dnsmasq restarted.
    assert names(pxe.plan(ctx, dataclasses.replace(converged, config=wanted.replace("c2", "c9")))) == [
        "pxe: write dnsmasq's config"]
    assert isinstance(pxe.plan(ctx, dataclasses.replace(f, interface="")), Wait)


def test_a_node_without_the_role_stops_dnsmasq_first(published: tuple[str, str], tmp_path: Path) -> None:
    ctx = ctx_for(published[0], "s2", tmp_path)
    inv, conf = published
    f = facts(published=inv, published_conf=conf, unit=UNIT_ON, serving=False, marked=False, recorded=False,
              holder="s1", why="held by s1 (token 42)")
    plan = pxe.plan(ctx, f)
    assert names(plan) == ["pxe: stop dnsmasq"]
    assert not isinstance(plan, Wait) and "held by s1" in plan[0].why
    standby = dataclasses.replace(f, unit=UNIT_OFF, serving=True, marked=True)
    assert pxe.plan(ctx, standby) == []
    status = pxe.health(ctx, standby)
    assert (status.state, status.detail) == (State.OK, {"dhcp": "s1"})
    nobody = pxe.health(ctx, dataclasses.replace(standby, holder="", why="cannot confirm with etcd: down"))
    assert nobody.state == State.WAITING and "cannot confirm with etcd" in nobody.reason


def test_network_pxe_off_stops_and_gives_the_role_up(site: Site, tmp_path: Path) -> None:
    rendered = site.published(site.load(with_pxe(GROWN, "off")))
    inv, conf = (rendered / "inventory.json").read_text(), (rendered / "pxe" / "dnsmasq.conf").read_text()
    ctx = ctx_for(inv, "s1", tmp_path)
    running = facts(published=inv, published_conf=conf, unit=UNIT_ON, holding=True)
    assert names(pxe.plan(ctx, running)) == ["pxe: stop dnsmasq"]
    assert names(pxe.plan(ctx, dataclasses.replace(running, unit=UNIT_OFF))) == ["pxe: give up the DHCP role"]
    idle = dataclasses.replace(running, unit=UNIT_OFF, holding=False)
    assert pxe.plan(ctx, idle) == []
    assert pxe.health(ctx, idle) == core.Status(State.OFF, "network.pxe is off")


def test_a_damaged_publish_stops_dnsmasq_and_waits(published: tuple[str, str], tmp_path: Path) -> None:
    ctx = ctx_for(published[0], "s1", tmp_path)
    f = facts(published="{", published_conf=published[1], leader=True, unit=UNIT_ON)
    assert names(pxe.plan(ctx, f)) == ["pxe: stop dnsmasq"]
    waiting = pxe.plan(ctx, dataclasses.replace(f, unit=UNIT_OFF))
    assert isinstance(waiting, Wait) and "published inventory.json cannot be read" in waiting.reason


def test_every_installed_node_records_itself_once(published: tuple[str, str], tmp_path: Path) -> None:
    c1 = ctx_for(published[0], "c1", tmp_path)
    assert names(pxe.plan(c1, facts(marked=False, recorded=False))) == ["pxe: record this node as installed"]
    assert names(pxe.plan(c1, facts(marked=False, recorded=True))) == ["pxe: record this node as installed"]
    assert pxe.plan(c1, facts(marked=False, recorded=None)) == []  # etcd not there yet: quietly, next pass
    assert pxe.plan(c1, facts()) == []
    assert pxe.health(c1, facts()).state == State.OFF  # the core nodes serve
    c2 = ctx_for(published[0], "c2", tmp_path)  # diskless: fetches its seed on every boot
    assert pxe.plan(c2, facts(marked=False, recorded=False)) == []


def test_a_lost_role_stops_dnsmasq_at_once(monkeypatch: pytest.MonkeyPatch, published: tuple[str, str],
                                           tmp_path: Path) -> None:
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(host, "systemctl", lambda *args: calls.append(args))
    pxe.lost(ctx_for(published[0], "s1", tmp_path))
    assert calls == [("stop", pxe.UNIT)]


@pytest.mark.parametrize("mode", ["dhcp", "proxy"])
def test_the_config_the_agent_writes_is_one_dnsmasq_takes(site: Site, tmp_path: Path, mode: str) -> None:
    rendered = site.published(site.load(with_pxe(GROWN, mode)))
    ctx = ctx_for((rendered / "inventory.json").read_text(), "s1", tmp_path)
    conf = pxe.dnsmasq_config(ctx, (rendered / "pxe" / "dnsmasq.conf").read_text(), "ens3")
    assert "dhcp-boot=tag:ipxe,http://10.0.0.254:8080/lab/pxe/boot.ipxe" in conf or mode == "proxy"
    assert "dhcp-host=52:54:00:00:00:51,10.0.0.51,c1" in conf
    assert f"tftp-root={pxeserve.IPXE_DIR}" in conf and "interface=ens3" in conf
    path = tmp_path / "dnsmasq.conf"
    path.write_text(conf)
    proc = subprocess.run([DNSMASQ, "--test", f"--conf-file={path}"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "syntax check OK" in proc.stderr, proc.stderr


def test_the_dnsmasq_unit_is_never_enabled() -> None:
    unit = (REPO / "overlays/common/etc/systemd/system" / pxe.UNIT).read_text()
    assert "[Install]" not in unit and str(pxe.CONFIG) in unit


# ---------------------------------------------------------------- the cluster's HTTP side, on etcd


@dataclasses.dataclass
class Served:
    base: str
    root: Path
    client: EtcdClient
    log: list[str]
    etcd: EtcdCluster


@pytest.fixture
def served(etcd: EtcdCluster, site: Site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    """A core node's HTTP side: the published files, the installed set and discovery list in etcd
    (under prefixes of this test's own). Proxy mode: loopback is nobody's static address."""
    prefix = f"/test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(pxe, "INSTALLED", f"{prefix}/installed/")
    monkeypatch.setattr(pxe, "DISCOVERED", f"{prefix}/discovered/")
    old = site.load(EXAMPLE.read_text())
    config = node_config(tmp_path, (site.published(old) / "inventory.json").read_text())
    grown = site.load(with_pxe(GROWN, "proxy"))
    lay(grown, site.published(grown), images(tmp_path, grown), tmp_path, config)
    client = etcd.client()
    log: list[str] = []
    handler = pxeserve.make_handler(pxe.Publication(tmp_path / "pxe", "lab").current, pxe.EtcdInstalled(client),
                                    pxe.EtcdDiscoveries(client), log.append)
    with serving(handler) as url:
        yield Served(url, tmp_path / "pxe", client, log, etcd)


def test_the_cluster_serves_what_was_published(served: Served) -> None:
    base = served.base
    assert get(f"{base}/lab/pxe/boot.ipxe") == (served.root / "lab/pxe/boot.ipxe").read_bytes()
    assert get(f"{base}/lab/pxe/mac/52-54-00-00-00-51.ipxe").startswith(b"#!ipxe\n# Node c1")
    assert get(f"{base}/images/clusterforge-debian-12.raw.gz") == b"image" * 1000
    assert status(f"{base}/lab/../manifest.json") == 404 and status(f"{base}/manifest.json") == 404
    assert status(f"{base}/k3s/k3s") == 404  # the factory's own route


def test_the_cluster_keeps_the_seed_rule_in_etcd(served: Served) -> None:
    base = served.base
    assert get(f"{base}/lab/nodes/c1/user-data").startswith(b"#cloud-config")
    assert get(f"{base}/installed/52-54-00-00-00-51") == b"ok\n"
    assert served.client.get(pxe.INSTALLED + "52-54-00-00-00-51") is not None
    assert status(f"{base}/lab/nodes/c1/user-data") == 404
    assert get(f"{base}/lab/pxe/mac/52-54-00-00-00-51.ipxe") == pxeserve.LOCAL_BOOT
    assert any("c1 installed" in line for line in served.log)
    served.client.delete(pxe.INSTALLED + "52-54-00-00-00-51")  # what pxe.reinstall --on-cluster does
    assert status(f"{base}/lab/nodes/c1/user-data") == 200
    served.client.put(pxe.INSTALLED + "52-54-00-00-00-52", "{}")  # diskless: always served
    assert status(f"{base}/lab/nodes/c2/user-data") == 200
    assert status(f"{base}/installed/52-54-00-99-99-99") == 404


def test_a_node_records_itself_installed_once(served: Served, tmp_path: Path) -> None:
    from types import SimpleNamespace

    me = SimpleNamespace(mac=C1, name="c1")
    ctx: Any = SimpleNamespace(etcd=served.client, me=me, state_dir=tmp_path / "c1-var")
    pxe.mark_installed(ctx, put=True)
    assert served.client.get(pxe.INSTALLED + "52-54-00-00-00-51") is not None
    assert pxe.marker(ctx).exists()
    assert status(f"{served.base}/lab/pxe/mac/52-54-00-00-00-51.ipxe") == 200
    assert get(f"{served.base}/lab/pxe/mac/52-54-00-00-00-51.ipxe") == pxeserve.LOCAL_BOOT
    served.client.delete(pxe.INSTALLED + "52-54-00-00-00-51")  # pxe.reinstall --on-cluster
    pxe.mark_installed(ctx, put=False)  # what a marked node's next pass would do, if anything
    assert served.client.get(pxe.INSTALLED + "52-54-00-00-00-51") is None


def test_an_unreachable_etcd_serves_no_install_on_a_guess(served: Served, site: Site) -> None:
    dead = EtcdClient([f"https://127.0.0.1:{port}" for port in free_ports(1)], served.etcd.client_tls, timeout=1)
    log: list[str] = []
    handler = pxeserve.make_handler(pxe.Publication(served.root, "lab").current, pxe.EtcdInstalled(dead),
                                    pxe.EtcdDiscoveries(dead), log.append)
    server = pxeserve.HttpServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert status(f"{base}/lab/pxe/mac/52-54-00-00-00-51.ipxe") == 500  # boot.ipxe falls back to the menu
        assert status(f"{base}/lab/nodes/c1/user-data") == 500
        assert status(f"{base}/discover?mac=52-54-00-99-99-99") == 500
        assert status(f"{base}/lab/pxe/boot.ipxe") == 200
    finally:
        server.shutdown()
        server.server_close()
    assert any("cannot read the installed nodes from etcd" in line for line in log), log


def test_seeds_only_to_the_node_address_in_dhcp_mode(served: Served) -> None:
    """Loopback stands in for the cluster LAN: c1's static lease is 127.0.0.51."""
    import http.client

    inv = served.root / "lab" / "inventory.json"
    doc = json.loads(inv.read_text())
    doc["network"]["pxe"] = "dhcp"
    next(n for n in doc["nodes"] if n["name"] == "c1")["ip"] = "127.0.0.51"
    inv.write_text(json.dumps(doc))
    manifest = served.root / "manifest.json"
    manifest.write_text(manifest.read_text() + " ")  # a publish writes its manifest last: read again
    port = int(served.base.rsplit(":", 1)[1])

    def from_(source: str, path: str) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
        try:
            conn.request("GET", path)
            return conn.getresponse().status
        finally:
            conn.close()

    assert from_("127.0.0.51", "/lab/nodes/c1/user-data") == 200
    assert from_("127.0.0.52", "/lab/nodes/c1/user-data") == 404


def test_nothing_is_served_before_a_publish_or_with_pxe_off(served: Served) -> None:
    inv = served.root / "lab" / "inventory.json"
    inv.write_text(inv.read_text().replace('"pxe": "proxy"', '"pxe": "off"'))
    manifest = served.root / "manifest.json"
    manifest.write_text(manifest.read_text() + " ")
    assert status(f"{served.base}/lab/pxe/boot.ipxe") == 404
    manifest.unlink()
    assert status(f"{served.base}/lab/pxe/boot.ipxe") == 404


HOSTILE = [
    "mac=52-54-00-aa-00-01&manufacturer=Evil%0A%20%20-%20mac%3A%20%2252%3A54%3A00%3Aee%3Aee%3Aee%22%0A"
    "%20%20%20%20roles%3A%20%5Bcore%2C%20storage%5D",
    "mac=52-54-00-aa-00-02&product=" + "A" * 5000,
    "mac=52-54-00-aa-00-03%0A&platform=efi",
    "mac=52-54-00-aa-00-04&serial=%1b%5b2J%00x&unknown=1&other=2",
    "mac=52-54-00-AA-00-05&product=" + "B" * 300,
    "&".join(f"k{i}=v" for i in range(40)) + "&mac=52-54-00-aa-00-06",
]


def test_discovery_in_etcd_is_checked_capped_and_listed_for_pasting(served: Served,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The same checks as the factory's list; `pxe.discovered --from-cluster` reads etcdctl's answer."""
    base = served.base
    assert [status(f"{base}/discover?{query}") for query in HOSTILE] == [200, 414, 400, 200, 200, 400]
    get(f"{base}/discover?mac=52-54-00-00-00-11&platform=efi")  # a known node: recorded, not listed
    raw = served.client.get(pxe.DISCOVERED + "52:54:00:aa:00:05")
    assert raw is not None and len(json.loads(raw.value)["product"]) == 64
    listing_text = served.etcd.etcdctl("get", "--prefix", pxe.DISCOVERED, "-w", "json")
    example = inventory.load(EXAMPLE)
    listed = listing(cli.etcd_records(listing_text, pxe.DISCOVERED), (n.mac for n in example.nodes))
    entries = yaml.safe_load(listed)
    assert [e["mac"] for e in entries] == ["52:54:00:aa:00:01", "52:54:00:aa:00:04", "52:54:00:aa:00:05"]
    assert all(set(e) == {"mac", "roles"} for e in entries)
    assert all(" " <= c <= "~" for line in listed.splitlines() for c in line)

    monkeypatch.setattr(pxeserve, "MAX_MACHINES", 5)
    for i in range(8):
        get(f"{base}/discover?mac=52-54-00-bb-00-{i:02x}&platform=efi")
    assert len(served.client.get_prefix(pxe.DISCOVERED)) <= 5


def test_hand_written_etcd_records_are_cleaned_where_printed() -> None:
    import base64

    def kv(key: str, value: bytes) -> dict[str, str]:
        return {"key": base64.b64encode(key.encode()).decode(), "value": base64.b64encode(value).decode()}

    text = json.dumps({"kvs": [
        kv("/p/52:54:00:aa:00:01", json.dumps({"manufacturer": 'x\n  - mac: "52:54:00:ee:ee:ee"'}).encode()),
        kv("/p/not a mac\n  - mac: 1", b"{}"), kv("/p/52:54:00:aa:00:02", b"[1"), kv("/p/52:54:00:aa:00:03", b'"s"')]})
    listed = listing(cli.etcd_records(text, "/p/"), ())
    assert yaml.safe_load(listed) == [{"mac": "52:54:00:aa:00:01", "roles": ["compute"]}]
    with pytest.raises(UserError, match="etcdctl's answer cannot be read"):
        cli.etcd_records("not json", "/p/")


# ---------------------------------------------------------------- the QEMU harness: a node that never ran


def test_a_never_run_node_comes_as_new_hardware(tmp_path: Path, site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    from clusterforge.vm import cluster as vmcluster
    from clusterforge.vm.machine import Machine

    monkeypatch.setenv("CLUSTERFORGE_ACCEL", "tcg")
    paths = Paths(out=tmp_path / "dist", state=site.state, runs=tmp_path / "runs")
    vms = vmcluster.ClusterVMs(site.load(GROWN), tmp_path / "image.qcow2", paths)
    booted: list[list[str]] = []
    monkeypatch.setattr(vmcluster.ClusterVMs, "up", lambda self, names, timeout: booted.append(list(names)))
    monkeypatch.setattr(Machine, "running", property(lambda m: m.spec.name == "s1"))
    for name in ("s1", "s2"):  # they ran before
        (vms.dir / name).mkdir(parents=True)
        (vms.dir / name / "root.qcow2").write_bytes(b"")

    vms.start("s2")  # an old node starts as it always did
    spec = vms.spec(vms.cluster.node("s2"))
    assert [(d.path.name, d.bootindex) for d in spec.drives if d.media == "disk"][0] == ("root.qcow2", 1)
    assert any(d.path.name == "seed.iso" for d in spec.drives) and spec.nics[0].bootindex is None

    vms.start("c1")  # new hardware: an empty disk, the network first, no seed ISO
    spec = vms.spec(vms.cluster.node("c1"))
    assert [(d.path.name, d.bootindex) for d in spec.drives] == [("root.qcow2", 2)]
    assert spec.nics[0].bootindex == 1
    assert booted == [["s2"], ["c1"]]
    vms.start("c2")  # diskless new hardware: no disk at all
    assert vms.spec(vms.cluster.node("c2")).drives == ()
    assert not vms.never_ran(vms.cluster.node("c1"))  # and it stays so, once installed

    # A cluster none of whose nodes runs boots as before, from disk.
    monkeypatch.setattr(Machine, "running", property(lambda m: False))
    vms.start("s3")
    assert vms.spec(vms.cluster.node("s3")).nics[0].bootindex is None


# ---------------------------------------------------------------- the agent takes a republished seed in


def test_the_agent_takes_in_a_republished_seed(site: Site, tmp_path: Path) -> None:
    old = (site.published(site.load(EXAMPLE.read_text())) / "inventory.json").read_text()
    config = node_config(tmp_path, old)
    ctx = Ctx(seedlib.load(config), state_dir=tmp_path / "var")
    assert ctx.reload_seed() == ""
    (config / "cluster.json").write_text((site.published(site.load(GROWN)) / "inventory.json").read_text())
    assert ctx.reload_seed() == "agent: seed reloaded: 5 nodes (was 3)"
    assert [n.name for n in ctx.seed.cluster.nodes][-2:] == ["c1", "c2"]
    moved = json.loads(old)
    moved["network"]["vip"] = "10.0.0.250"
    (config / "cluster.json").write_text(json.dumps(moved))
    said = ctx.reload_seed()
    assert "not taken in: the network moved" in said and len(ctx.seed.cluster.nodes) == 5
    assert ctx.reload_seed() == ""  # said once
    (config / "cluster.json").write_text("{")
    assert "keeping the seed it started with" in ctx.reload_seed()
