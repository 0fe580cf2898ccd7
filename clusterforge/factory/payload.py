"""What the node image gets from this repository: the node package and overlays/.

One tar, made the same way for the Debian image (Packer uploads it), the Ubuntu image,
and the Ubuntu autoinstall (which carries it in the node's cloud-init). Only node code
is in it: clusterforge/node/ and the node-safe modules it imports (log.py, run.py);
tests/unit/test_node_code.py holds node code to that.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from .context import REPO_ROOT

# The package's files that run on nodes, relative to clusterforge/.
NODE_SOURCES = ("__init__.py", "log.py", "run.py", "node")
PROVISION = "images/provision"
OVERLAYS = "overlays"


def node_sources(root: Path = REPO_ROOT) -> list[Path]:
    return [root / "clusterforge" / name for name in NODE_SOURCES]


def _files(top: Path) -> list[Path]:
    if top.is_file():
        return [top]
    return sorted(p for p in top.rglob("*")
                  if "__pycache__" not in p.parts and p.suffix != ".pyc" and (p.is_file() or p.is_symlink()))


def payload_bytes(root: Path = REPO_ROOT) -> bytes:
    """The tar, byte-identical for identical inputs (no times, owners or listing order)."""
    entries: list[tuple[str, Path]] = []
    for source in node_sources(root):
        for path in _files(source):
            entries.append((f"clusterforge/{path.relative_to(root / 'clusterforge').as_posix()}", path))
    overlays = root / OVERLAYS
    for folder in sorted(p for p in overlays.iterdir() if p.is_dir()):
        for path in _files(folder):
            rel = path.relative_to(folder)
            if len(rel.parts) == 1 and rel.name.startswith("README"):
                continue  # documents the overlay folder; not a file for the image
            entries.append((f"overlays/{folder.name}/{rel.as_posix()}", path))
    for path in _files(root / PROVISION):
        entries.append((f"provision/{path.name}", path))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in sorted(entries):
            info = tar.gettarinfo(str(path), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = 0
            info.mode = 0o755 if info.mode & 0o111 else 0o644
            if info.isfile():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return out.getvalue()


def write_payload(path: Path, root: Path = REPO_ROOT) -> None:
    path.write_bytes(payload_bytes(root))
