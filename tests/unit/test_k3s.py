"""K3s from an air-gap bundle (issue 16): the bundle's checks, K3s's configuration, the agent's
plan on recorded-style facts, and the bundle beside the image (installer ISO, PXE server, QEMU
drive).

No K3s can be had where this runs. Every bundle here is a fixture that passes the static checks
only (a copy of /bin/true carrying a K3s version string), and nothing here ever runs it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pycdlib
import pytest

from clusterforge import inventory, k3sbundle, render
from clusterforge.factory.iso import stage_iso
from clusterforge.log import UserError
from clusterforge.node import seed as seedlib
from clusterforge.node.agent import core, k3s
from clusterforge.node.agent.context import Ctx
from clusterforge.node.agent.core import State, Step, Wait
from clusterforge.paths import Paths
from clusterforge.pxe.discovery import Discoveries
from clusterforge.pxe.http import HttpServer, Installed, make_handler
from clusterforge.vm import accel
from clusterforge.vm.cluster import ClusterVMs
from clusterforge.vm.machine import Machine

from .conftest import DATA, EXAMPLE, KEY, write_inventory

FACTS = DATA / "facts"
VERSION = b"v1.30.4+k3s1"
IMAGES = "k3s-airgap-images-amd64.tar.zst"


def fake_k3s(version: bytes = VERSION) -> bytes:
    """An x86-64 ELF carrying a K3s version string: passes the static checks, is never K3s."""
    return Path("/bin/true").read_bytes() + b"\0" + version + b"\0"


def make_bundle(folder: Path, version: bytes = VERSION, images: str = IMAGES) -> Path:
    folder.mkdir(parents=True)
    (folder / "k3s").write_bytes(fake_k3s(version))
    (folder / images).write_bytes(b"(images)" * 100)
    return folder


def make_tarball(path: Path, members: dict[str, bytes], mode: str = "w", prefix: str = "") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# ---------------------------------------------------------------- the bundle, checked at validation

HEAD = f"""
cluster:
  name: lab
network:
  subnet: 10.0.0.0/24
access:
  ssh_authorized_keys: ["{KEY}"]
services: {{etcd: true, ceph: false, wireguard: true, slurm: false, k3s: true, k3s_bundle: BUNDLE}}
nodes:
  - {{mac: "52:54:00:00:00:01", roles: [core]}}
"""  # services at line 7


def load_with(tmp_path: Path, bundle: str) -> inventory.Cluster:
    return inventory.load(write_inventory(tmp_path, HEAD.replace("BUNDLE", bundle)))


def refused(tmp_path: Path, bundle: str, fragment: str) -> str:
    """Loading fails at file:line: field, saying what is wrong."""
    with pytest.raises(UserError) as info:
        load_with(tmp_path, bundle)
    message = str(info.value)
    assert info.value.message.startswith(f"{tmp_path / 'inv.yaml'}:7: services.k3s_bundle: "), message
    assert fragment in message, message
    return message


def test_bundle_directory_accepted(tmp_path: Path) -> None:
    make_bundle(tmp_path / "bundle")
    cluster = load_with(tmp_path, "bundle")
    assert cluster.services.k3s_bundle == tmp_path / "bundle"
    bundle = k3sbundle.require(tmp_path / "bundle")
    assert (bundle.version, bundle.images, bundle.tarball) == ("v1.30.4+k3s1", IMAGES, False)


def test_bundle_without_images(tmp_path: Path) -> None:
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "k3s").write_bytes(fake_k3s())
    refused(tmp_path, "bundle", "no air-gap images in the bundle")


def test_bundle_with_a_text_file_named_k3s(tmp_path: Path) -> None:
    make_bundle(tmp_path / "bundle")
    (tmp_path / "bundle" / "k3s").write_text("#!/bin/sh\necho v1.30.4+k3s1\n")
    refused(tmp_path, "bundle", "not an x86-64 ELF executable")


def test_bundle_with_an_arm64_binary(tmp_path: Path) -> None:
    make_bundle(tmp_path / "bundle")
    data = bytearray(fake_k3s())
    data[18:20] = (0xB7).to_bytes(2, "little")  # e_machine: AArch64
    (tmp_path / "bundle" / "k3s").write_bytes(bytes(data))
    refused(tmp_path, "bundle", "not an x86-64 ELF executable")


def test_bundle_binary_without_version(tmp_path: Path) -> None:
    make_bundle(tmp_path / "bundle")
    shutil.copyfile("/bin/true", tmp_path / "bundle" / "k3s")
    refused(tmp_path, "bundle", "no K3s version found")


@pytest.mark.parametrize("version", [b"v1.25.16+k3s4", b"v1.31.0+k3s1", b"v1.34.1+k3s1"])
def test_bundle_with_an_unsupported_version(tmp_path: Path, version: bytes) -> None:
    make_bundle(tmp_path / "bundle", version)
    message = refused(tmp_path, "bundle", f"K3s {version.decode()} is not supported")
    assert "v1.26 to v1.30" in message


@pytest.mark.parametrize("version", [b"v1.26.0+k3s1", b"v1.30.14+k3s2"])
def test_bundle_supported_range(tmp_path: Path, version: bytes) -> None:
    make_bundle(tmp_path / "bundle", version)
    assert k3sbundle.require(tmp_path / "bundle").version == version.decode()


def test_bundle_with_empty_images(tmp_path: Path) -> None:
    make_bundle(tmp_path / "bundle")
    (tmp_path / "bundle" / IMAGES).write_bytes(b"")
    refused(tmp_path, "bundle", "the images tarball is empty")


def test_bundle_images_directory_is_not_images(tmp_path: Path) -> None:
    """A directory named like the .tar is passed over for the .tar.zst beside it."""
    make_bundle(tmp_path / "bundle")
    (tmp_path / "bundle" / "k3s-airgap-images-amd64.tar").mkdir()
    assert k3sbundle.require(tmp_path / "bundle").images == IMAGES


@pytest.mark.parametrize("mode, name, prefix", [("w", "bundle.tar", ""), ("w:gz", "bundle.tar.gz", "./")])
def test_bundle_tarball_accepted(tmp_path: Path, mode: str, name: str, prefix: str) -> None:
    make_tarball(tmp_path / name, {"k3s": fake_k3s(), "k3s-airgap-images-amd64.tar": b"images"}, mode, prefix)
    load_with(tmp_path, name)
    bundle = k3sbundle.require(tmp_path / name)
    assert (bundle.version, bundle.images, bundle.tarball) == ("v1.30.4+k3s1", "k3s-airgap-images-amd64.tar", True)


@pytest.mark.parametrize("members, fragment", [
    ({"k3s": fake_k3s()}, "no air-gap images at the top of the tarball"),
    ({"bundle/k3s": fake_k3s(), f"bundle/{IMAGES}": b"x"}, "no 'k3s' binary at the top of the tarball"),
    ({"k3s": b"#!/bin/sh\n", IMAGES: b"x"}, "not an x86-64 ELF executable"),
    ({"k3s": fake_k3s(b"v1.33.2+k3s1"), IMAGES: b"x"}, "is not supported"),
])
def test_bundle_tarball_refused(tmp_path: Path, members: dict[str, bytes], fragment: str) -> None:
    make_tarball(tmp_path / "bundle.tar.gz", members, "w:gz")
    refused(tmp_path, "bundle.tar.gz", fragment)


def test_bundle_not_a_tarball(tmp_path: Path) -> None:
    (tmp_path / "bundle.tar").write_bytes(os.urandom(4096))
    refused(tmp_path, "bundle.tar", "not a directory or a readable tarball")


def test_bundle_files_read_the_same_from_both_forms(tmp_path: Path) -> None:
    folder = k3sbundle.require(make_bundle(tmp_path / "bundle"))
    tarball = k3sbundle.require(make_tarball(tmp_path / "bundle.tar", {
        name: (folder.path / name).read_bytes() for name in folder.files}))
    assert k3sbundle.digest(folder) == k3sbundle.digest(tarball)
    for bundle, target in ((folder, tmp_path / "a"), (tarball, tmp_path / "b")):
        placed = k3sbundle.place(bundle, target)
        assert sorted(placed) == ["k3s", IMAGES]
        assert placed["k3s"].read_bytes() == fake_k3s() and placed["k3s"].stat().st_mode & 0o777 == 0o755


def test_shared_declarations() -> None:
    """The factory ships what the node looks for: one declaration of each."""
    assert k3sbundle.IMAGES is k3s.IMAGES and k3sbundle.BINARY == k3s.BINARY
    assert k3s.BOOT_HTTP_PORT == inventory.HTTP_PORT


# ---------------------------------------------------------------- reading a binary (never running it)

def test_binary_version_read_from_the_file() -> None:
    assert k3s.binary_version(io.BytesIO(fake_k3s())) == "v1.30.4+k3s1"
    assert k3s.binary_version(io.BytesIO(b"#!/bin/sh\nv1.30.4+k3s1\n")) == ""
    assert k3s.binary_version(io.BytesIO(Path("/bin/true").read_bytes())) == ""


def test_binary_version_across_a_chunk_boundary() -> None:
    head = Path("/bin/true").read_bytes()[:20]
    for cut in range(1, 12):  # the version string split anywhere by the first chunk's end
        data = head + b"\0" * (k3s.CHUNK - cut) + b"v1.30.14+k3s12\0"
        assert k3s.binary_version(io.BytesIO(data)) == "v1.30.14+k3s12", cut


# ---------------------------------------------------------------- recorded-style facts -> plan

def fixture(name: str, **changes: Any) -> tuple[Ctx, k3s.Facts]:
    """A node's seed and its K3s facts, as `python3 -m clusterforge.node.agent.facts` prints them."""
    doc = json.loads((FACTS / name).read_text())
    seed = seedlib.Seed(seedlib.ClusterSeed.from_dict(doc["cluster"]), seedlib.Identity.from_dict(doc["identity"]))
    facts = core.from_jsonable(k3s.Facts, doc["facts"]["k3s"])
    return Ctx(seed), dataclasses.replace(facts, **changes)


def names(plan: core.Plan) -> list[str]:
    assert not isinstance(plan, Wait), plan
    return [step.name for step in plan]


def one_pass(ctx: Ctx, facts: k3s.Facts) -> core.Status:
    """The loop's own pass over the K3s module, facts fed from the fixture; no step is applied."""
    service = SimpleNamespace(name=k3s.name, needs=(), applies=k3s.applies, facts=lambda ctx: facts,
                              plan=lambda ctx, f: [Step(s.name, s.why, lambda: None) for s in p]
                              if isinstance(p := k3s.plan(ctx, f), list) else p, health=k3s.health)
    result = core.run_pass(ctx, [service], {}, lambda line: None)
    return result.statuses["k3s"]


def test_fixtures_round_trip() -> None:
    for path in sorted(FACTS.glob("k3s-*.json")):
        _, facts = fixture(path.name)
        assert core.from_jsonable(k3s.Facts, json.loads(json.dumps(core.to_jsonable(facts)))) == facts


def test_no_bundle_waits_not_verified() -> None:
    ctx, facts = fixture("k3s-s2-no-bundle.json")
    plan = k3s.plan(ctx, facts)
    assert isinstance(plan, Wait)
    assert plan.reason.startswith("not verified: no bundle")
    assert "http://10.0.0.2:8080/k3s" in plan.reason and "CF-K3S" in plan.reason
    status = one_pass(ctx, facts)
    assert status.state == State.WAITING and status.reason.startswith("not verified: no bundle")
    assert core.describe("k3s", status).startswith("k3s: waiting: not verified: no bundle")


def test_bundle_drive_is_mounted_first() -> None:
    ctx, facts = fixture("k3s-s1-device.json")
    plan = k3s.plan(ctx, facts)
    assert names(plan) == ["k3s: mount the bundle"]
    assert "/dev/disk/by-label/CF-K3S" in str(plan[0])


def test_bundle_mounted_nothing_installed_installs() -> None:
    ctx, facts = fixture("k3s-s1-bundle-mounted.json")
    plan = k3s.plan(ctx, facts)
    assert names(plan) == ["k3s: install the binary", "k3s: install the air-gap images", "k3s: link kubectl",
                           "k3s: install the datastore TLS files", "k3s: write config.yaml"]
    assert [str(s) for s in plan][:2] == [
        "k3s: install the binary: v1.30.4+k3s1 from /run/clusterforge/k3s-bundle",
        f"k3s: install the air-gap images: {IMAGES} from /run/clusterforge/k3s-bundle"]


def test_installed_the_first_server_starts_without_waiting() -> None:
    ctx, converged = fixture("k3s-s1-converged.json")
    facts = dataclasses.replace(converged, unit=k3s.host.Unit("k3s.service", "inactive", "dead", "static", "success"),
                                joined=False, kubelet_ok=False, nodes=None, servers_up={"s2": False, "s3": False})
    assert names(k3s.plan(ctx, facts)) == ["k3s: start the server"]


def test_converged_server_plans_nothing_and_reports_nodes() -> None:
    ctx, facts = fixture("k3s-s1-converged.json")
    assert k3s.plan(ctx, facts) == []
    status = one_pass(ctx, facts)
    assert (status.state, status.reason) == (State.OK, "4 of 4 nodes Ready")
    record = status.to_dict()
    assert record["nodes"] == {"s1": True, "s2": True, "s3": True, "c1": True}
    assert record["version"] == "v1.30.4+k3s1"


def test_a_node_not_ready_degrades() -> None:
    ctx, facts = fixture("k3s-s1-converged.json")
    status = k3s.health(ctx, dataclasses.replace(facts, nodes={"s1": True, "s2": True, "s3": True}))
    assert (status.state, status.reason) == (State.DEGRADED, "3 of 4 nodes Ready (c1 not Ready)")
    status = k3s.health(ctx, dataclasses.replace(facts, nodes={"s1": False, "s2": True, "s3": True, "c1": True}))
    assert status.state == State.WAITING and "this node is not Ready" in status.reason


def test_agent_waits_for_the_first_server() -> None:
    ctx, facts = fixture("k3s-c1-waiting-for-first-server.json")
    plan = k3s.plan(ctx, facts)
    assert isinstance(plan, Wait)
    assert plan.reason == ("waiting for the first K3s server, s1, to answer at https://10.0.0.11:6443 "
                           "(one server starts before the others)")
    # Any server answering means the datastore is bootstrapped: the agent starts.
    assert names(k3s.plan(ctx, dataclasses.replace(facts, servers_up={"s1": False, "s2": True, "s3": False}))) == [
        "k3s: start the agent"]
    # K3s ran here before: it starts without waiting (the first server may be gone for good).
    assert names(k3s.plan(ctx, dataclasses.replace(facts, joined=True))) == ["k3s: start the agent"]


def test_second_server_waits_for_the_first() -> None:
    ctx, facts = fixture("k3s-s2-no-bundle.json")
    _, converged = fixture("k3s-s1-converged.json")
    installed = dataclasses.replace(converged, config=k3s.config(ctx), joined=False, kubelet_ok=False, nodes=None,
                                    unit=k3s.host.Unit("k3s.service", "inactive", "dead", "static", "success"),
                                    servers_up=facts.servers_up)
    plan = k3s.plan(ctx, installed)
    assert isinstance(plan, Wait) and "first K3s server, s1" in plan.reason
    up = dataclasses.replace(installed, servers_up={"s1": True, "s3": False})
    assert names(k3s.plan(ctx, up)) == ["k3s: start the server"]


def test_starting_and_running() -> None:
    ctx, facts = fixture("k3s-s1-converged.json")
    activating = dataclasses.replace(facts, unit=dataclasses.replace(facts.unit, active="activating"))
    assert k3s.plan(ctx, activating) == Wait("k3s.service is starting")
    assert names(k3s.plan(ctx, dataclasses.replace(facts, joined=False))) == ["k3s: remember that K3s ran here"]
    assert k3s.plan(ctx, dataclasses.replace(facts, default_route=False)) == Wait(
        "K3s needs a default route and this node has none")


def test_converged_without_a_bundle_stays_converged() -> None:
    """The bundle drive may be gone after the install: what is installed is enough."""
    ctx, facts = fixture("k3s-s1-converged.json", source=None)
    assert k3s.plan(ctx, facts) == []


def test_new_bundle_version_reinstalls() -> None:
    ctx, facts = fixture("k3s-s1-converged.json")
    assert facts.source is not None
    newer = dataclasses.replace(facts.source, version="v1.30.5+k3s1",
                                files={**facts.source.files, "k3s": facts.source.files["k3s"] + 4096})
    plan = k3s.plan(ctx, dataclasses.replace(facts, source=newer))
    assert [str(s) for s in plan] == [
        "k3s: install the binary: v1.30.5+k3s1 from /run/clusterforge/k3s-bundle (was v1.30.4+k3s1)"]


def test_config_change_rewrites() -> None:
    ctx, facts = fixture("k3s-s1-converged.json")
    plan = k3s.plan(ctx, dataclasses.replace(facts, config=facts.config.replace("wg0", "eth0")))
    assert [str(s) for s in plan] == ["k3s: write config.yaml: settings changed"]


def test_applies() -> None:
    ctx, _ = fixture("k3s-s1-converged.json")
    agent, _ = fixture("k3s-c1-waiting-for-first-server.json")
    assert k3s.applies(ctx) and k3s.applies(agent)
    off = dataclasses.replace(ctx.seed.cluster, services={**ctx.seed.cluster.services, seedlib.Service.K3S: False})
    assert not k3s.applies(Ctx(dataclasses.replace(ctx.seed, cluster=off)))
    status = core.run_pass(Ctx(dataclasses.replace(ctx.seed, cluster=off)), [k3s], {}, lambda line: None)
    assert status.statuses["k3s"].state == State.OFF
    storage = dataclasses.replace(ctx.seed.cluster, nodes=tuple(
        dataclasses.replace(n, roles=(seedlib.Role.STORAGE,)) if n.name == "s1" else n for n in ctx.seed.cluster.nodes))
    assert not k3s.applies(Ctx(dataclasses.replace(ctx.seed, cluster=storage)))


# ---------------------------------------------------------------- K3s's configuration

SERVER_CONFIG = """\
# Written by the clusterforge agent, which rewrites it. Settings of your own go in
# /etc/rancher/k3s/config.yaml.d/*.yaml (read after this file; restart k3s.service after changing them).
token-file: /etc/clusterforge/secrets/k3s-token
node-name: s2
node-ip: 10.99.0.12
flannel-iface: wg0
datastore-endpoint: "https://10.0.0.12:2379,https://10.0.0.11:2379,https://10.0.0.13:2379"
datastore-cafile: /etc/rancher/k3s/datastore/ca.crt
datastore-certfile: /etc/rancher/k3s/datastore/node.crt
datastore-keyfile: /etc/rancher/k3s/datastore/node.key
# Port 80 serves clusterforge's health API: no bundled ingress, no service load balancer.
disable:
  - traefik
  - servicelb
tls-san:
  - 10.0.0.254
  - 10.0.0.12
  - s2.lab.internal
write-kubeconfig-mode: "0600"
"""

AGENT_CONFIG = """\
# Written by the clusterforge agent, which rewrites it. Settings of your own go in
# /etc/rancher/k3s/config.yaml.d/*.yaml (read after this file; restart k3s-agent.service after changing them).
token-file: /etc/clusterforge/secrets/k3s-token
node-name: c1
node-ip: 10.99.0.51
flannel-iface: wg0
server: https://10.0.0.254:6443
"""


def test_server_config() -> None:
    ctx, _ = fixture("k3s-s2-no-bundle.json")
    assert k3s.config(ctx) == SERVER_CONFIG
    assert ":2380" not in SERVER_CONFIG and "cluster-init" not in SERVER_CONFIG  # no embedded etcd


def test_agent_config() -> None:
    ctx, _ = fixture("k3s-c1-waiting-for-first-server.json")
    assert k3s.config(ctx) == AGENT_CONFIG


def test_config_without_the_mesh() -> None:
    ctx, _ = fixture("k3s-c1-waiting-for-first-server.json")
    cluster = dataclasses.replace(ctx.seed.cluster, services={**ctx.seed.cluster.services,
                                                               seedlib.Service.WIREGUARD: False})
    text = k3s.config(Ctx(dataclasses.replace(ctx.seed, cluster=cluster)))
    assert "node-ip: 10.0.0.51\n" in text and "flannel-iface" not in text


def test_config_is_yaml_k3s_reads() -> None:
    import yaml

    ctx, _ = fixture("k3s-s2-no-bundle.json")
    doc = yaml.safe_load(k3s.config(ctx))
    assert doc["datastore-endpoint"].split(",") == ctx.etcd_endpoints()
    assert doc["disable"] == ["traefik", "servicelb"] and doc["write-kubeconfig-mode"] == "0600"
    assert doc["token-file"] == str(ctx.seed.secret(seedlib.K3S_TOKEN))


def test_units_in_the_image() -> None:
    units = Path(__file__).resolve().parents[2] / "overlays/common/etc/systemd/system"
    for unit_name, command in ((k3s.SERVER_UNIT, "server"), (k3s.AGENT_UNIT, "agent")):
        text = (units / unit_name).read_text()
        assert f"ExecStart={k3s.INSTALLED} {command}\n" in text
        assert f"ConditionPathExists={k3s.CONFIG}\n" in text and f"ConditionPathExists={k3s.INSTALLED}\n" in text
        assert "[Install]" not in text  # never enabled: the agent starts it once wg0 and etcd are up
        assert "Type=notify" in text  # hence the agent's `systemctl start --no-block`


# ---------------------------------------------------------------- node side, on files only

def test_dir_source_and_installer_copy(tmp_path: Path) -> None:
    medium = tmp_path / "medium"
    make_bundle(medium / k3s.MEDIUM_DIR)
    source = k3s.dir_source(medium / k3s.MEDIUM_DIR)
    assert source is not None and source.version == "v1.30.4+k3s1" and source.images == IMAGES
    assert source.files == {"k3s": len(fake_k3s()), IMAGES: 800}
    root = tmp_path / "target"
    assert k3s.copy_from_medium(medium, root)
    copied = root / "var/lib/clusterforge/k3s"
    assert (copied / "k3s").read_bytes() == fake_k3s() and (copied / "k3s").stat().st_mode & 0o777 == 0o755
    assert k3s.dir_source(copied) == dataclasses.replace(source, where=str(copied))
    assert not k3s.copy_from_medium(tmp_path / "no-medium", root)
    (medium / k3s.MEDIUM_DIR / "k3s").write_text("not k3s")
    assert k3s.dir_source(medium / k3s.MEDIUM_DIR) is None


# ---------------------------------------------------------------- beside the image

def k3s_inventory(tmp_path: Path, bundle: str = "k3s-bundle") -> inventory.Cluster:
    text = EXAMPLE.read_text().replace(
        "  k3s: false               # needs an air-gap bundle: k3s_bundle: path/to/bundle",
        f"  k3s: true\n  k3s_bundle: {bundle}")
    assert "k3s: true" in text
    return inventory.load(write_inventory(tmp_path, text, "cluster.yaml"))


def test_iso_carries_the_bundle(tmp_path: Path, state: Path, example: inventory.Cluster) -> None:
    make_bundle(tmp_path / "k3s-bundle")
    netboot = tmp_path / "netboot"
    netboot.mkdir()
    for name in ("vmlinuz", "initrd.img", "root.squashfs"):
        (netboot / name).write_bytes(name.encode())
    image_gz = tmp_path / "image.raw.gz"
    image_gz.write_bytes(b"image")
    for cluster, staging in ((k3s_inventory(tmp_path), tmp_path / "with"), (example, tmp_path / "without")):
        rendered = render.render(cluster, tmp_path / f"dist-{staging.name}", state).path
        stage_iso(staging, cluster, rendered, netboot, image_gz, "grub")
    assert (tmp_path / "with/clusterforge/k3s/k3s").read_bytes() == fake_k3s()
    assert (tmp_path / "with/clusterforge/k3s" / IMAGES).read_bytes() == b"(images)" * 100
    assert (tmp_path / "with/clusterforge/image.raw.gz").exists()
    assert not (tmp_path / "without/clusterforge/k3s").exists()
    # The seeds never carry it.
    assert not any(b"(images)" in p.read_bytes() for p in (tmp_path / "dist-with").rglob("*") if p.is_file())


@pytest.fixture
def pxe(tmp_path: Path, state: Path) -> Iterator[Any]:
    servers: list[HttpServer] = []

    def serve(cluster: inventory.Cluster) -> str:
        rendered = render.render(cluster, tmp_path / "dist", state).path
        handler = make_handler(cluster, rendered, tmp_path / "images", Discoveries(state / "lab", cluster),
                               Installed(state / "lab"), lambda line: None, seeds_by_address=False)
        server = HttpServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def status_of(url: str, method: str = "GET") -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as reply:
            return reply.status, reply.read(), reply.headers.get("Content-Length", "")
    except urllib.error.HTTPError as exc:
        return exc.code, b"", ""


@pytest.mark.parametrize("form", ["directory", "tarball"])
def test_pxe_serves_the_bundle(tmp_path: Path, pxe: Any, form: str) -> None:
    make_bundle(tmp_path / "k3s-bundle")
    name = "k3s-bundle"
    if form == "tarball":
        name = "k3s-bundle.tar.gz"
        make_tarball(tmp_path / name, {n: (tmp_path / "k3s-bundle" / n).read_bytes() for n in ("k3s", IMAGES)},
                     "w:gz")
    base = pxe(k3s_inventory(tmp_path, name))
    assert status_of(f"{base}/k3s/k3s") == (200, fake_k3s(), str(len(fake_k3s())))
    assert status_of(f"{base}/k3s/{IMAGES}")[:2] == (200, b"(images)" * 100)
    assert status_of(f"{base}/k3s/{IMAGES}", "HEAD") == (200, b"", "800")
    for path in ("k3s/k3s-airgap-images-amd64.tar", "k3s/other", "k3s", "k3s/k3s/x", "k3s/..%2fcluster.yaml"):
        assert status_of(f"{base}/{path}")[0] == 404, path
    # The node's own fetch, against the real server: what the agent does on a diskless node.
    source = k3s.http_source(f"{base}/{k3s.URL_DIR}")
    assert source == k3s.Source(f"{base}/k3s", {"k3s": len(fake_k3s()), IMAGES: 800})
    k3s.fetch(source, IMAGES, tmp_path / "node" / IMAGES, 0o644)
    assert (tmp_path / "node" / IMAGES).read_bytes() == b"(images)" * 100


def test_pxe_without_a_bundle(pxe: Any, example: inventory.Cluster) -> None:
    base = pxe(example)
    assert status_of(f"{base}/k3s/k3s")[0] == 404
    assert k3s.http_source(f"{base}/k3s") is None


def test_vm_attaches_the_bundle_read_only(tmp_path: Path) -> None:
    make_bundle(tmp_path / "k3s-bundle")
    cluster = k3s_inventory(tmp_path)
    vms = ClusterVMs(cluster, tmp_path / "image.qcow2", Paths(tmp_path / "dist", tmp_path / "state",
                                                              tmp_path / "runs"))
    vms._accel = accel.TCG  # no boot probe: nothing boots here
    node = cluster.nodes[0]
    drives = [d for d in vms.spec(node).drives if d.path == vms.k3s_drive]
    assert len(drives) == 1 and drives[0].readonly and (drives[0].format, drives[0].media) == ("raw", "cdrom")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    (vms.dir / node.name).mkdir(parents=True)
    argv = Machine(vms.spec(node), vms.dir, accel.TCG).argv()
    assert any(a.startswith("if=none,id=drive") and f"file={vms.k3s_drive},format=raw,readonly=on" in a
               for a in argv)


def test_vm_without_a_bundle_has_no_drive(tmp_path: Path, example: inventory.Cluster) -> None:
    vms = ClusterVMs(example, tmp_path / "image.qcow2", Paths(tmp_path / "d", tmp_path / "s", tmp_path / "r"))
    vms._accel = accel.TCG
    assert all(d.path != vms.k3s_drive for d in vms.spec(example.nodes[0]).drives)


def test_bundle_drive_image(tmp_path: Path) -> None:
    bundle = k3sbundle.require(make_bundle(tmp_path / "k3s-bundle"))
    out = k3sbundle.write_drive(bundle, tmp_path / "run" / "k3s-bundle.iso")
    iso = pycdlib.PyCdlib()
    iso.open(str(out))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == "CF-K3S"
        files = {}
        for child in iso.list_children(rr_path="/"):
            if child.is_file():
                buf = io.BytesIO()
                iso.get_file_from_iso_fp(buf, rr_path="/" + child.rock_ridge.name().decode())
                files[child.rock_ridge.name().decode()] = buf.getvalue()
    finally:
        iso.close()
    assert files == {"k3s": fake_k3s(), IMAGES: b"(images)" * 100}
    before = out.stat().st_mtime_ns
    assert k3sbundle.write_drive(bundle, out) == out and out.stat().st_mtime_ns == before  # unchanged: kept
    blkid = shutil.which("blkid") or "/sbin/blkid"
    if Path(blkid).exists():  # what udev names /dev/disk/by-label/ from
        label = subprocess.run([blkid, "-p", "-o", "value", "-s", "LABEL", str(out)], capture_output=True, text=True)
        assert label.stdout.strip() == k3s.LABEL


def test_facts_and_steps_on_a_sandboxed_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """facts() and the install steps for real, on files under tmp_path: the installer's copy is
    found, installed where K3s's air-gap layout wants it, and the next pass finds it converged
    up to the start (which waits for the first server). The binary is copied, never run."""
    if os.geteuid() != 0:
        pytest.skip("the agent's writes set root as the owner")
    root = tmp_path / "node"
    for name in ("INSTALLED", "KUBECTL"):
        monkeypatch.setattr(k3s, name, root / "usr/local/bin" / getattr(k3s, name).name)
    monkeypatch.setattr(k3s, "IMAGES_DIR", root / "var/lib/rancher/k3s/agent/images")
    monkeypatch.setattr(k3s, "CONF_DIR", root / "etc/rancher/k3s")
    monkeypatch.setattr(k3s, "CONFIG", root / "etc/rancher/k3s/config.yaml")
    monkeypatch.setattr(k3s, "DROP_INS", root / "etc/rancher/k3s/config.yaml.d")
    monkeypatch.setattr(k3s, "TLS_DIR", root / "etc/rancher/k3s/datastore")
    monkeypatch.setattr(k3s, "BY_LABEL", root / "dev/disk/by-label/CF-K3S")
    monkeypatch.setattr(k3s, "api_answers", lambda ip: False)
    monkeypatch.setattr(k3s, "http_source", lambda base: None)  # no boot server here
    recorded, _ = fixture("k3s-s2-no-bundle.json")
    seed = dataclasses.replace(recorded.seed, root=root / "etc/clusterforge")
    for name in (seedlib.CA_CERT, seedlib.NODE_CERT, seedlib.NODE_KEY):
        seed.pki(name).parent.mkdir(parents=True, exist_ok=True)
        seed.pki(name).write_text(f"(pem of {name})\n")
    ctx = Ctx(seed, state_dir=root / "var/lib/clusterforge", run_dir=root / "run/clusterforge")
    facts = k3s.facts(ctx)
    assert isinstance(k3s.plan(ctx, facts), Wait)
    make_bundle(ctx.state_dir / k3s.LOCAL_DIR)  # what the installer copies from its medium
    plan = k3s.plan(ctx, k3s.facts(ctx))
    assert names(plan) == ["k3s: install the binary", "k3s: install the air-gap images", "k3s: link kubectl",
                           "k3s: install the datastore TLS files", "k3s: write config.yaml"]
    for step in plan:
        step.apply()
    assert k3s.INSTALLED.read_bytes() == fake_k3s() and k3s.INSTALLED.stat().st_mode & 0o777 == 0o755
    assert (k3s.IMAGES_DIR / IMAGES).read_bytes() == b"(images)" * 100
    assert os.readlink(k3s.KUBECTL) == "k3s"
    assert (k3s.TLS_DIR / "node.key").read_text() == "(pem of node.key)\n"
    assert (k3s.TLS_DIR / "node.key").stat().st_mode & 0o777 == 0o600
    assert k3s.CONFIG.read_text() == k3s.config(ctx) and k3s.CONFIG.stat().st_mode & 0o777 == 0o600
    after = k3s.facts(ctx)
    assert (after.binary_version, after.kubectl, after.tls_ok) == ("v1.30.4+k3s1", "k3s", True)
    plan = k3s.plan(ctx, after)
    if after.default_route:  # this machine's own routes decide which wait comes first
        assert isinstance(plan, Wait) and "first K3s server, s1" in plan.reason
