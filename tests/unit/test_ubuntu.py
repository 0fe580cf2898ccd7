"""os: ubuntu-24.04: the Packer template and its autoinstall are valid (no Ubuntu ISO here to build with)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from clusterforge.factory import ubuntu
from clusterforge.factory.context import BuildContext
from clusterforge.log import UserError
from clusterforge.vm.accel import TCG

from .test_render import SCHEMA


def test_packer_validate_passes(tmp_path: Path) -> None:
    iso = tmp_path / "ubuntu-24.04-live-server-amd64.iso"
    iso.write_bytes(b"\0" * 2048)  # packer validate reads the template, not the ISO
    template = ubuntu.prepare(BuildContext.create(out=tmp_path / "dist"), iso, tmp_path / "work", TCG)
    builder = json.loads(template.read_text())["builders"][0]
    assert builder["iso_url"] == str(iso) and builder["type"] == "qemu"
    proc = subprocess.run(["packer", "validate", str(template)], capture_output=True, text=True,
                          env={"CHECKPOINT_DISABLE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = template.with_name("broken.json")
    broken.write_text(template.read_text().replace('"iso_checksum"', '"iso_chekcsum"'))
    proc = subprocess.run(["packer", "validate", str(broken)], capture_output=True, text=True,
                          env={"CHECKPOINT_DISABLE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0


@pytest.mark.skipif(not SCHEMA.exists(), reason="autoinstall schema not present")
def test_build_autoinstall_is_valid(tmp_path: Path) -> None:
    iso = tmp_path / "ubuntu.iso"
    iso.write_bytes(b"\0")
    ubuntu.prepare(BuildContext.create(out=tmp_path / "dist"), iso, tmp_path / "work", TCG)
    user_data = (tmp_path / "work" / "http" / "user-data").read_text()
    assert user_data.startswith("#cloud-config\n")
    autoinstall = yaml.safe_load(user_data)["autoinstall"]
    jsonschema.validate(autoinstall, json.loads(SCHEMA.read_text()))
    assert "etcd-server" in autoinstall["packages"]


def test_missing_iso_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="Ubuntu ISO not found"):
        ubuntu.prepare(BuildContext.create(out=tmp_path / "dist"), tmp_path / "nope.iso", tmp_path / "w", TCG)
