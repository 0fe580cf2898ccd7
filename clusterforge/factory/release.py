"""A release: the artifacts, SHA256SUMS and manifest.json in dist/release/<build-id>/.

The build id is a hash of every stage's input hash, so the same inputs give the same id.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from ..fsutil import atomic_path
from ..inventory import Cluster
from ..log import stage
from ..run import run
from .context import BuildContext, read_stamp
from .loop import mounted_root
from .pipeline import Artifacts

CHUNK = 8 * 1024**2


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def installed_packages(raw: Path) -> dict[str, str]:
    with mounted_root(raw) as root:
        out = run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W", "-f", "${Package}\t${Version}\n"]).stdout
    return dict(line.split("\t", 1) for line in out.splitlines() if line)


def make_release(ctx: BuildContext, cluster: Cluster, artifacts: Artifacts,
                 proof: tuple[Path, Path] | None = None) -> Path:
    """proof: the verification's report.json and report.html, shipped (and checksummed) with
    the artifacts; None when the release was made with --no-verify (the manifest says so)."""
    inputs = {
        "rootfs": read_stamp(ctx.rootfs_dir), "base_disk": read_stamp(ctx.base_disk),
        "qcow2": read_stamp(artifacts.qcow2), "raw": read_stamp(artifacts.raw),
        "netboot": read_stamp(artifacts.netboot) if artifacts.netboot else None,
        "image_gz": read_stamp(artifacts.image_gz) if artifacts.image_gz else None,
        "iso": read_stamp(artifacts.iso) if artifacts.iso else None,
    }
    build_id = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    out = ctx.out / "release" / build_id
    files: list[Path] = [artifacts.qcow2, artifacts.raw]
    files += [p for p in (artifacts.image_gz, artifacts.iso, artifacts.usb) if p]
    if artifacts.netboot:
        files += sorted(artifacts.netboot.iterdir())
    if proof is not None:
        files += list(proof)
    with stage(f"release {build_id}"), atomic_path(out) as tmp:
        tmp.mkdir()
        sums, listed = [], []
        for path in files:
            name = f"netboot/{path.name}" if path.parent == artifacts.netboot else path.name
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(path, target)  # releases share the build's bytes
            except OSError:
                shutil.copyfile(path, target)
            digest = sha256(path)
            sums.append(f"{digest}  {name}\n")
            listed.append({"name": name, "size": path.stat().st_size, "sha256": digest})
        (tmp / "SHA256SUMS").write_text("".join(sums))
        manifest = {
            "build_id": build_id, "image": ctx.name, "cluster": cluster.name,
            "inputs": inputs, "artifacts": listed,
            "packages": installed_packages(artifacts.raw),
            "verification": (json.loads(proof[0].read_text()).get("verdict", "?") + ": see report.html")
            if proof is not None else "not verified",
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out
