"""What `./forge cluster.publish` keeps on each core node, and how a node takes it in.

Standard library only: this runs on the core nodes, over SSH with clusterforge's key.

    /var/lib/clusterforge/pxe/<cluster>/   the tree rendered for the cluster's own PXE (iPXE
                                           scripts pointing at the VIP, seeds, inventory.json,
                                           dnsmasq.conf)
    /var/lib/clusterforge/pxe/images/      the image's netboot files and the compressed image
    /var/lib/clusterforge/pxe/manifest.json  what is there: path -> sha256, size, mode; written
                                           last, so a publish cut short is sent again

    python3 -m clusterforge.node.pxepublish state     what the node has, as JSON on stdout
    python3 -m clusterforge.node.pxepublish receive   a publish, as a tar on stdin

The tar holds, in order: PLAN (the new manifest, the paths to delete), then files/<path> for
each file that changed (each written to a temporary name beside its place, checked against
the manifest, and renamed into place), then, when it changed, cluster.json (the core seed,
replacing /etc/clusterforge/cluster.json atomically) and crl.pem (the CA's newest list of
revoked certificates: taken only when the CA signed it and it is newer than the node's; the
agent passes it on to every node through etcd). The deletions and the manifest come last.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from . import seed as seedlib

ROOT = Path("/var/lib/clusterforge/pxe")
MANIFEST = "manifest.json"
PLAN = "PLAN"
FILES = "files/"
CLUSTER_JSON = "cluster.json"
CRL = "crl.pem"
IMAGES = "images"
MODES = {"0600": 0o600, "0644": 0o644}  # seeds (private keys) and everything else
CHUNK = 1024 * 1024
MAX_JSON = 64 * 1024 * 1024  # the plan of a cluster of thousands of nodes is a few MiB
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
MAX_DEPTH = 5

Manifest = dict[str, dict[str, Any]]  # path -> {"sha256": hex, "size": bytes, "mode": "0644"}


class PublishError(Exception):
    """What was sent cannot be taken in; nothing of it is left half-written."""


def safe_path(rel: str, cluster: str) -> bool:
    """A path inside the layout: under <cluster>/ or images/, plain names only."""
    parts = rel.split("/")
    return (len(parts) <= MAX_DEPTH and parts[0] in (cluster, IMAGES) and len(parts) > 1
            and all(_PART.fullmatch(p) for p in parts) and not any(p in (".", "..") for p in parts))


def read_manifest(root: Path = ROOT) -> Manifest | None:
    try:
        data = json.loads((root / MANIFEST).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def state(root: Path = ROOT, config: Path = seedlib.CONFIG_DIR) -> dict[str, Any]:
    """What this node has: its published manifest and inventory, its seed's cluster.json and CA."""
    identity = json.loads(read_text(config / seedlib.IDENTITY_JSON) or "{}")
    cluster = str(identity.get("cluster", ""))
    return {
        "node": identity.get("node"),
        "cluster": cluster,
        "manifest": read_manifest(root),
        "inventory": read_text(root / cluster / "inventory.json") if _PART.fullmatch(cluster) else None,
        "cluster_json": read_text(config / seedlib.CLUSTER_JSON),
        "ca": read_text(config / seedlib.PKI_DIR / seedlib.CA_CERT),
        "crl": read_text(config / seedlib.PKI_DIR / seedlib.CRL),
    }


def _write_stream(target: Path, data: IO[bytes], entry: Mapping[str, Any]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.publish-{os.getpid()}")
    digest = hashlib.sha256()
    size = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, MODES[entry["mode"]])
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), MODES[entry["mode"]])
            while chunk := data.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if digest.hexdigest() != entry["sha256"] or size != entry["size"]:
            raise PublishError(f"{target}: received {size} bytes that do not match the manifest")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _write_small(target: Path, data: bytes, mode: int) -> None:
    tmp = target.with_name(f".{target.name}.publish-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _check_plan(plan: Any) -> tuple[str, Manifest, list[str]]:
    if not isinstance(plan, dict) or not isinstance(plan.get("cluster"), str):
        raise PublishError("the publish's plan is malformed")
    cluster = plan["cluster"]
    manifest, delete = plan.get("manifest"), plan.get("delete")
    if not isinstance(manifest, dict) or not isinstance(delete, list):
        raise PublishError("the publish's plan is malformed")
    for rel, entry in manifest.items():
        if (not safe_path(rel, cluster) or not isinstance(entry, dict) or entry.get("mode") not in MODES
                or not isinstance(entry.get("sha256"), str) or not isinstance(entry.get("size"), int)):
            raise PublishError(f"the publish's manifest names {rel[:80]!r}, which is not a file it can hold")
    if not all(isinstance(rel, str) and safe_path(rel, cluster) and rel not in manifest for rel in delete):
        raise PublishError("the publish's plan deletes a path outside its files")
    return cluster, manifest, delete


def _small(member: tarfile.TarInfo, data: IO[bytes]) -> bytes:
    if member.size > MAX_JSON:
        raise PublishError(f"{member.name} in the publish is larger than {MAX_JSON} bytes")
    return data.read()


def _take_crl(text: str, pki_dir: Path) -> list[str]:
    """The CA's CRL, when it is newer than this node's (a lower number never replaces a higher)."""
    from .agent.pki import crl_number

    number = crl_number(text, pki_dir / seedlib.CA_CERT)
    if number is None:
        raise PublishError("the publish's CRL is not one this cluster's CA signed")
    have = crl_number(read_text(pki_dir / seedlib.CRL) or "", pki_dir / seedlib.CA_CERT)
    if have is not None and have >= number:
        return []
    _write_small(pki_dir / seedlib.CRL, text.encode(), 0o644)
    return [str(pki_dir / seedlib.CRL)]


def receive(stream: IO[bytes], root: Path = ROOT, config: Path = seedlib.CONFIG_DIR) -> list[str]:
    """Take a publish in (see the module's docstring); the lines saying what changed."""
    done: list[str] = []
    cluster = ""
    manifest: Manifest = {}
    delete: list[str] = []
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            data = tar.extractfile(member) if member.isfile() else None
            if data is None:
                raise PublishError(f"{member.name[:80]!r} in the publish is not a file")
            if member.name == PLAN:
                cluster, manifest, delete = _check_plan(json.loads(_small(member, data)))
                continue
            if not cluster:
                raise PublishError("the publish does not start with its plan")
            if member.name.startswith(FILES):
                rel = member.name.removeprefix(FILES)
                if rel not in manifest:
                    raise PublishError(f"{rel[:80]!r} is not in the publish's manifest")
                _write_stream(root / rel, data, manifest[rel])
                done.append(rel)
            elif member.name == CLUSTER_JSON:
                text = _small(member, data)
                current = seedlib.load(config)
                new = seedlib.parse(text, current.identity.to_json(), config)  # names this node, or refused
                if new.cluster.name != cluster:
                    raise PublishError(f"the publish is for cluster {cluster}, its seed for {new.cluster.name}")
                _write_small(config / seedlib.CLUSTER_JSON, text, 0o644)
                done.append(str(config / seedlib.CLUSTER_JSON))
            elif member.name == CRL:
                done += _take_crl(_small(member, data).decode(errors="replace"), config / seedlib.PKI_DIR)
            else:
                raise PublishError(f"{member.name[:80]!r} has no place in a publish")
    if not cluster:
        raise PublishError("the publish is empty")
    for rel in delete:
        (root / rel).unlink(missing_ok=True)
        done.append(f"deleted {rel}")
    root.mkdir(parents=True, exist_ok=True)
    _write_small(root / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode(), 0o644)
    return done


def main(argv: list[str]) -> int:
    if argv == ["state"]:
        print(json.dumps(state()))
        return 0
    if argv == ["receive"]:
        try:
            done = receive(sys.stdin.buffer)
        except (PublishError, seedlib.SeedError, tarfile.TarError, OSError, ValueError) as exc:
            print(f"publish refused on this node: {exc}", file=sys.stderr)
            return 1
        print(f"took in {len(done)} changes")
        return 0
    print("usage: python3 -m clusterforge.node.pxepublish state|receive", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
