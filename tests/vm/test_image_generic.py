"""The generic image holds no identity and no secret: those come from each node's seed."""

from __future__ import annotations

from pathlib import Path

from clusterforge import inventory
from clusterforge.factory import pipeline
from clusterforge.factory.loop import mounted_root
from clusterforge.node import layout

PRIVATE_MARKERS = (b"PRIVATE KEY-----", b"OPENSSH PRIVATE KEY")
SEARCHED = ("etc", "root", "home", "var/lib", "usr/share/clusterforge", "opt")


def test_image_has_no_identity_or_secret(image: pipeline.Artifacts,
                                         lab: tuple[inventory.Cluster, Path, Path]) -> None:
    cluster, _, state = lab
    cluster_secrets = [(state / cluster.name / name).read_bytes() for name in ("munge.key", "k3s-token")]
    with mounted_root(image.raw) as root:
        assert (root / "etc/machine-id").read_text() == ""
        assert not (root / "var/lib/dbus/machine-id").exists() or (root / "var/lib/dbus/machine-id").is_symlink()
        assert sorted((root / "etc/ssh").glob("ssh_host_*")) == []
        assert not (root / "root/.ssh/authorized_keys").exists()
        assert not (root / "var/lib/cloud/instance").exists()
        assert not (root / "etc/clusterforge/identity.json").exists()
        assert list((root / "var/lib/cloud").glob("seed/nocloud*/*")) == []
        offenders = []
        for top in SEARCHED:
            for path in (root / top).rglob("*"):
                if path.is_file() and not path.is_symlink() and path.stat().st_size < 1 << 20:
                    data = path.read_bytes()
                    if any(m in data for m in PRIVATE_MARKERS) or any(s in data for s in cluster_secrets):
                        offenders.append(str(path.relative_to(root)))
        assert offenders == []
        # The node code the seed activates is in the image for the image's own Python; the
        # factory's code (inventory, secrets, render) is not.
        site = root / layout.SITE_PACKAGES.lstrip("/") / "clusterforge"
        assert (site / "node/agent/core.py").exists() and (site / "node/seed.py").exists()
        assert not (site / "inventory.py").exists() and not (site / "secrets.py").exists()
