"""Node code apart from factory code: what goes into the image, and what keys its build."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from clusterforge import inventory, render
from clusterforge.factory import packer, payload
from clusterforge.factory.context import BuildContext, write_stamp
from clusterforge.node import seed as seedlib

from .conftest import REPO

# What the factory host has and a node has not (python3-yaml is in the image: allowed).
FACTORY_ONLY = ("jinja2", "cryptography", "pycdlib", "qemu", "invoke")


def node_modules() -> list[str]:
    root = REPO / "clusterforge"
    mods = []
    for path in sorted((root / "node").rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods.append(".".join(parts))
    return mods


def test_node_modules_import_without_factory_packages() -> None:
    """Each node module imports in a python where jinja2, cryptography, pycdlib, qemu and invoke
    cannot be imported, as on a node (Debian's python3 with the standard library and yaml)."""
    blocker = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {list(FACTORY_ONLY)!r}:\n"
        "            raise ImportError('factory-only package on a node: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import importlib\n"
        "for m in sys.argv[1:]:\n"
        "    importlib.import_module(m)\n"
        "leaked = sorted(n for n in sys.modules if n.startswith('clusterforge.') and not (\n"
        "    n.startswith('clusterforge.node') or n in ('clusterforge.log', 'clusterforge.run')))\n"
        "assert not leaked, leaked\n"
    )
    modules = node_modules()
    assert "clusterforge.node.seed" in modules and "clusterforge.node.installer" in modules
    proc = subprocess.run([sys.executable, "-I", "-c", blocker, *modules], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_payload_holds_node_code_only() -> None:
    with tarfile.open(fileobj=io.BytesIO(payload.payload_bytes())) as tar:
        names = tar.getnames()
    package = {n for n in names if n.startswith("clusterforge/")}
    assert "clusterforge/node/seed.py" in package and "clusterforge/run.py" in package
    assert not any(n.startswith(("clusterforge/factory/", "clusterforge/vm/", "clusterforge/pxe/"))
                   for n in package)
    assert "clusterforge/secrets.py" not in package and "clusterforge/render.py" not in package
    assert any(n.startswith("overlays/common/") for n in names)
    assert payload.payload_bytes() == payload.payload_bytes()  # deterministic


def test_image_stage_key_follows_node_code_only(tmp_path: Path) -> None:
    """Touching a factory module leaves the Packer stage's key alone; touching a node module
    changes it (a copy of the repository, so nothing real is edited)."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("clusterforge", "overlays", "images"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    ctx = BuildContext.create(root=root, out=tmp_path / "dist")
    ctx.base_disk.parent.mkdir(parents=True)
    ctx.base_disk.write_bytes(b"base disk")
    write_stamp(ctx.base_disk, "base-disk-key")
    before = packer.packer_key(ctx)
    with open(root / "clusterforge" / "secrets.py", "a") as f:
        f.write("\n# a factory-side edit\n")
    assert packer.packer_key(ctx) == before
    with open(root / "clusterforge" / "node" / "seed.py", "a") as f:
        f.write("\n# a node-side edit\n")
    assert packer.packer_key(ctx) != before


def write_files(user_data: str) -> dict[str, str]:
    return {f["path"]: f.get("content", "") for f in yaml.safe_load(user_data)["write_files"]}


def test_seed_round_trip(example: inventory.Cluster, rendered: Path) -> None:
    """The factory writes the seed from one definition; the node reads it back, field by field."""
    conf = seedlib.CONFIG_DIR
    for node in example.nodes:
        files = write_files((rendered / "nodes" / node.name / "user-data").read_text())
        seed = seedlib.parse(files[f"{conf}/{seedlib.CLUSTER_JSON}"], files[f"{conf}/{seedlib.IDENTITY_JSON}"])
        c = seed.cluster
        assert (c.name, c.domain, c.os, c.timezone) == (example.name, example.domain, str(example.os), example.timezone)
        net = example.network
        assert (c.network.subnet, c.network.gateway, c.network.dns, c.network.vip, c.network.overlay,
                c.network.boot_server) == (net.subnet, net.gateway, net.dns, net.vip, net.overlay, net.boot_server)
        assert c.services == example.services.enabled
        assert seed.identity == seedlib.Identity(example.name, node.name)
        assert seed.me.name == node.name
        for theirs in c.nodes:
            ours = example.node(theirs.name)
            assert (theirs.mac, theirs.roles, theirs.ip, theirs.overlay_ip, theirs.disks, theirs.boot, theirs.fqdn) == (
                ours.mac, ours.roles, ours.ip, ours.overlay_ip, ours.disks, ours.boot, example.fqdn(ours))
            assert len(theirs.wireguard_public) == 44
        assert c.ceph_fsid and not c.k3s_bundle
        # Every secret file lands where the node reads it.
        for name in (seedlib.WIREGUARD_KEY, seedlib.MUNGE_KEY, seedlib.CEPH_MON_KEY, seedlib.CEPH_ADMIN_KEY,
                     seedlib.CEPH_MGR_KEY, seedlib.CEPH_BOOTSTRAP_OSD_KEY):
            assert str(seed.secret(name)) in files, name
        for name in (seedlib.CA_CERT, seedlib.NODE_CERT, seedlib.NODE_KEY):
            assert str(seed.pki(name)) in files
        assert seedlib.ClusterSeed.from_dict(json.loads(c.to_json())) == c


def test_non_core_seed_knows_core_and_itself(tmp_path: Path, state: Path) -> None:
    text = (REPO / "examples/cluster.yaml").read_text() + (
        '  - mac: "52:54:00:00:00:21"\n    roles: [compute]\n')
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    cluster = inventory.load(path)
    out = render.render(cluster, tmp_path / "dist", state).path
    files = write_files((out / "nodes/c1/user-data").read_text())
    seed = seedlib.parse(files["/etc/clusterforge/cluster.json"], files["/etc/clusterforge/identity.json"])
    assert [n.name for n in seed.cluster.nodes] == ["s1", "s2", "s3", "c1"]
    # A compute node gets no Ceph monitor or admin key.
    assert "/etc/clusterforge/secrets/ceph-admin.key" not in files
    assert "/etc/clusterforge/secrets/ceph-mon.key" not in files


def test_seed_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    with pytest.raises(seedlib.SeedError, match="no seed"):
        seedlib.load(tmp_path)
    (tmp_path / "cluster.json").write_text('{"schema": 99}')
    (tmp_path / "identity.json").write_text('{"cluster": "lab", "node": "s1"}')
    with pytest.raises(seedlib.SeedError, match="schema 99"):
        seedlib.load(tmp_path)
