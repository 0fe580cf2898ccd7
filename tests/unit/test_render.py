"""Rendering: golden files, determinism, real validators, atomic replacement."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from clusterforge import inventory, render, seediso
from clusterforge.render import Site, TemplateError, dnsmasq_conf

from .conftest import DATA, EXAMPLE, write_inventory

GOLDEN = DATA / "golden" / "lab"
# Ubuntu's autoinstall schema, kept beside the repository in shared/reference/.
SCHEMA = Path(__file__).resolve().parents[3] / "shared" / "reference" / "autoinstall-schema.json"
TEXT_FILES = ["inventory.json", "pxe/boot.ipxe", "pxe/menu.ipxe", "pxe/dnsmasq.conf",
              "pxe/mac/52-54-00-00-00-11.ipxe"] + [
    f"nodes/s1/{name}" for name in ("user-data", "meta-data", "network-config")]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout(rendered: Path) -> None:
    expected = {"inventory.json", "pxe/boot.ipxe", "pxe/menu.ipxe", "pxe/dnsmasq.conf"}
    for mac in ("11", "12", "13"):
        expected.add(f"pxe/mac/52-54-00-00-00-{mac}.ipxe")
    for node in ("s1", "s2", "s3"):
        for name in ("user-data", "meta-data", "network-config", "seed.iso"):
            expected.add(f"nodes/{node}/{name}")
    assert set(tree(rendered)) == expected


@pytest.mark.parametrize("name", TEXT_FILES)
def test_golden(rendered: Path, name: str) -> None:
    """Rendered text equals the reviewed golden copy (UPDATE_GOLDEN=1 rewrites them)."""
    got = (rendered / name).read_text()
    golden = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(got)
    assert got == golden.read_text(), f"{name} differs from {golden}"


def test_render_twice_is_byte_identical(example: inventory.Cluster, state: Path,
                                        tmp_path: Path) -> None:
    first = tree(render.render(example, tmp_path / "a", state).path)
    second = tree(render.render(example, tmp_path / "b", state).path)
    again = tree(render.render(example, tmp_path / "a", state).path)
    assert first == second == again


def test_user_data_valid_by_cloud_init(rendered: Path) -> None:
    for user_data in sorted(rendered.glob("nodes/*/user-data")):
        proc = subprocess.run(["cloud-init", "schema", "-c", str(user_data)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Valid cloud-config" in proc.stdout


def test_cloud_init_validator_rejects_a_broken_user_data(rendered: Path, tmp_path: Path) -> None:
    broken = tmp_path / "user-data"
    text = (rendered / "nodes/s1/user-data").read_text()
    broken.write_text(text.replace("ssh_pwauth: false", "ssh_pwauth: [1, 2]"))
    proc = subprocess.run(["cloud-init", "schema", "-c", str(broken)], capture_output=True, text=True)
    assert proc.returncode != 0


def test_user_data_content(rendered: Path, example: inventory.Cluster) -> None:
    data = yaml.safe_load((rendered / "nodes/s2/user-data").read_text())
    assert data["hostname"] == "s2" and data["fqdn"] == "s2.lab.internal"
    assert example.ssh_authorized_keys[0] in data["ssh_authorized_keys"]
    files = {f["path"]: f for f in data["write_files"]}
    facts = json.loads(files["/etc/clusterforge/cluster.json"]["content"])
    assert facts["nodes"][1]["name"] == "s2"
    assert all(n["wireguard_public"] for n in facts["nodes"])
    assert json.loads(files["/etc/clusterforge/identity.json"]["content"]) == {
        "cluster": "lab", "node": "s2"}
    assert files["/etc/clusterforge/pki/node.key"]["permissions"] == "0600"


def test_private_keys_only_in_their_own_seed(rendered: Path, state: Path) -> None:
    for owner, mac in (("s1", "52-54-00-00-00-11"), ("s2", "52-54-00-00-00-12"), ("s3", "52-54-00-00-00-13")):
        tls_key = (state / "lab/nodes" / mac / "tls.key").read_text().strip()
        wg_key = (state / "lab/nodes" / mac / "wireguard.key").read_text().strip()
        for node in ("s1", "s2", "s3"):
            seed = (rendered / "nodes" / node / "user-data").read_text()
            assert (tls_key.splitlines()[1] in seed) == (node == owner)
            assert (wg_key in seed) == (node == owner)
    everything = b"".join(tree(rendered).values())
    assert b"ca.key" not in everything
    assert (state / "lab/ca.key").read_bytes().splitlines()[1] not in everything


def test_network_config_matches_mac(rendered: Path) -> None:
    net = yaml.safe_load((rendered / "nodes/s3/network-config").read_text())
    eth = net["ethernets"]["cluster"]
    assert net["version"] == 2
    assert eth["match"]["macaddress"] == "52:54:00:00:00:13"
    assert eth["addresses"] == ["10.0.0.13/24"]


@pytest.mark.skipif(not SCHEMA.exists(), reason=f"{SCHEMA} not present beside this checkout")
def test_autoinstall_valid_against_schema(state: Path, tmp_path: Path) -> None:
    ubuntu = inventory.load(write_inventory(tmp_path, EXAMPLE.read_text().replace("os: debian-12", "os: ubuntu-24.04")))
    rendered = render.render(ubuntu, tmp_path / "dist", state).path
    schema = json.loads(SCHEMA.read_text())
    paths = sorted(rendered.glob("nodes/*/autoinstall.yaml"))
    assert len(paths) == 3
    for path in paths:
        data = yaml.safe_load(path.read_text())
        jsonschema.validate(data, schema)
        assert data["user-data"]["hostname"] == path.parent.name
        # The node package travels in the node's cloud-init: no URL of something nothing builds.
        payload = next(f for f in data["user-data"]["write_files"] if f["path"].endswith("payload.tar"))
        names = tarfile.open(fileobj=io.BytesIO(gzip.decompress(base64.b64decode(payload["content"])))).getnames()
        assert "clusterforge/node/seed.py" in names and "provision/10-clusterforge.sh" in names
        assert "http" not in json.dumps(data["late-commands"])
    assert not list((tmp_path / "dist/lab").glob("*/*/agent*"))
    broken = yaml.safe_load((rendered / "nodes/s1/autoinstall.yaml").read_text())
    broken["shutdown"] = "explode"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_seed_iso_reads_back(rendered: Path) -> None:
    for node in ("s1", "s2", "s3"):
        directory = rendered / "nodes" / node
        label, files = seediso.read_seed_iso(directory / "seed.iso")
        assert label == "cidata"
        assert set(files) == {"user-data", "meta-data", "network-config"}
        for name, data in files.items():
            assert data == (directory / name).read_bytes()


def test_seed_iso_has_joliet_names(rendered: Path) -> None:
    import pycdlib

    iso = pycdlib.PyCdlib()
    iso.open(str(rendered / "nodes/s1/seed.iso"))
    names = sorted(c.file_identifier().decode("utf-16-be") for c in iso.list_children(joliet_path="/")
                   if c.is_file())
    iso.close()
    assert names == ["meta-data", "network-config", "user-data"]


def test_ipxe_scripts(rendered: Path) -> None:
    boot = (rendered / "pxe/boot.ipxe").read_text()
    assert boot.startswith("#!ipxe\n")
    assert "chain --autofree ${cluster}/pxe/mac/${mac:hexhyp}.ipxe || chain --autofree ${cluster}/pxe/menu.ipxe" in boot
    node = (rendered / "pxe/mac/52-54-00-00-00-12.ipxe").read_text()
    assert "clusterforge.mode=install clusterforge.seed=${seed}" in node
    assert "set seed ${base}/lab/nodes/s2/" in node


@pytest.mark.parametrize("mode", ["dhcp", "proxy"])
def test_dnsmasq_conf_accepted_by_dnsmasq(example: inventory.Cluster, tmp_path: Path,
                                          mode: str) -> None:
    conf = tmp_path / "dnsmasq.conf"
    conf.write_text(dnsmasq_conf(example, Site(example.network.boot_server), mode))
    dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    proc = subprocess.run([dnsmasq, "--test", f"--conf-file={conf}"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    conf.write_text(conf.read_text() + "dhcp-rnage=oops\n")
    proc = subprocess.run([dnsmasq, "--test", f"--conf-file={conf}"], capture_output=True,
                          text=True)
    assert proc.returncode != 0


def test_failed_render_leaves_previous_output(example: inventory.Cluster, state: Path,
                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "dist"
    before = tree(render.render(example, out, state).path)
    original = render.render_template

    def failing(name: str, **context: object) -> str:
        node = context.get("node")
        if node is not None and getattr(node, "name", "") == "s3":
            raise TemplateError("user-data.j2:1: boom")
        return original(name, **context)

    monkeypatch.setattr(render, "render_template", failing)
    with pytest.raises(TemplateError):
        render.render(example, out, state)
    assert tree(out / "lab") == before
    assert sorted(p.name for p in out.iterdir()) == [".lab.lock", "lab"]  # no temporary left behind


def test_template_error_names_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match=r"meta-data\.j2:1: .*undefined"):
        render.render_template("meta-data.j2")
