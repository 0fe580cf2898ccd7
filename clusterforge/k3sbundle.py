"""A K3s air-gap bundle: the k3s binary and the images tarball, from K3s's release files.

K3s cannot be downloaded where clusterforge is developed, so it comes from the user as a
directory or a tarball holding `k3s` and `k3s-airgap-images-amd64.tar[.gz|.zst]`. It is
checked here, at validation, and travels beside the image (never inside it, never in a
seed): on the installer medium, from the PXE server, and to QEMU machines as a read-only
drive labelled CF-K3S. The node side (what it looks for, where) is node/agent/k3s.py.

The version must be one whose API server is documented to work with Debian's etcd 3.4.23
as its datastore (see SUPPORTED_MINORS).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .fsutil import atomic_path
from .log import die, shorten
from .node.agent import k3s as node_k3s
from .yamlsource import Field

BINARY, IMAGES = node_k3s.BINARY, node_k3s.IMAGES
LABEL = node_k3s.LABEL
# K3s minor versions documented to work on Debian's etcd 3.4.23: Kubernetes asks for etcd
# 3.4.22 or later up to 1.30, and from 1.31 on for 3.4.29 or later (health endpoints that
# 3.4.23 lacks). K3s itself certifies its external etcd datastore against 3.5. Older minors
# are out of support upstream.
SUPPORTED_MINORS = range(26, 31)
MAX_SHOWN = 100  # characters of a path in a message
CHUNK = 4 * 1024**2


@dataclass(frozen=True)
class Bundle:
    path: Path
    version: str
    images: str  # the images tarball's file name

    @property
    def files(self) -> tuple[str, str]:
        return BINARY, self.images

    @property
    def tarball(self) -> bool:
        return not self.path.is_dir()


def check(path: Path, at: Field) -> Bundle:
    shown = shorten(str(path), MAX_SHOWN)  # the user's text: quoted, escaped, cut
    try:
        return _check(path, at, shown)
    except OSError as exc:  # a name too long, a directory that cannot be read
        at.fail(f"{shown}: cannot read the bundle: {exc.strerror}")


def _check(path: Path, at: Field, shown: str) -> Bundle:
    if not path.exists():
        at.fail(f"K3s bundle not found: {shown}",
                hint="a directory or tarball with the k3s binary and k3s-airgap-images-amd64.tar(.gz|.zst)")
    if path.is_dir():
        images = next((name for name in IMAGES if (path / name).is_file()), None)
        if not (path / BINARY).is_file():
            at.fail(f"{shown}: no 'k3s' binary in the bundle", hint="copy k3s from K3s's release files into it")
        if images is None:
            at.fail(f"{shown}: no air-gap images in the bundle",
                    hint=f"add {IMAGES[0]} (or .gz/.zst) from K3s's release files")
        if (path / images).stat().st_size == 0:
            at.fail(f"{shown}/{images}: the images tarball is empty")
        with open(path / BINARY, "rb") as binary:
            version = _binary_version(binary, at, f"{shown}/{BINARY}")
        return Bundle(path, version, images)
    if not path.is_file():
        at.fail(f"{shown}: neither a directory nor a tarball")
    try:
        with tarfile.open(path) as tar:
            members = {m.name.removeprefix("./"): m for m in tar.getmembers() if m.isfile()}
            images = next((name for name in IMAGES if name in members), None)
            if BINARY not in members:
                at.fail(f"{shown}: no 'k3s' binary at the top of the tarball")
            if images is None:
                at.fail(f"{shown}: no air-gap images at the top of the tarball (one of {', '.join(IMAGES)})")
            if members[images].size == 0:
                at.fail(f"{shown}:{images}: the images tarball is empty")
            member = tar.extractfile(members[BINARY])
            assert member is not None
            version = _binary_version(member, at, f"{shown}:{BINARY}")
    except (tarfile.TarError, OSError) as exc:
        at.fail(f"{shown}: not a directory or a readable tarball ({shorten(str(exc), MAX_SHOWN)})")
    return Bundle(path, version, images)


def _binary_version(binary: IO[bytes], at: Field, where: str) -> str:
    head = binary.read(20)
    if head[:4] != b"\x7fELF" or len(head) < 20 or int.from_bytes(head[18:20], "little") != node_k3s.ELF_X86_64:
        at.fail(f"{where}: not an x86-64 ELF executable", hint="use the k3s binary (amd64) from K3s's release files")
    binary.seek(0)
    version = node_k3s.binary_version(binary)  # the same reading as the node's
    match = node_k3s.VERSION.fullmatch(version.encode())
    if match is None:
        at.fail(f"{where}: no K3s version found in the binary")
    if int(match.group(1)) not in SUPPORTED_MINORS:
        at.fail(f"{where}: K3s {version} is not supported",
                hint=f"use K3s v1.{SUPPORTED_MINORS.start} to v1.{SUPPORTED_MINORS.stop - 1}, whose API server "
                     "works with etcd 3.4 (Debian's) as its datastore")
    return version


def require(path: Path) -> Bundle:
    """For commands that ship the bundle: check it again (it may have changed since validation)."""
    return check(path, Field(path, 0, "services.k3s_bundle")) if path.exists() else die(
        f"K3s bundle not found: {path}")


# ---------------------------------------------------------------- shipping it

@contextmanager
def opened(bundle: Bundle, name: str) -> Iterator[tuple[int, IO[bytes]]]:
    """One file of the bundle, as (size, readable stream): from the directory or out of the tarball."""
    if name not in bundle.files:
        raise KeyError(name)
    if not bundle.tarball:
        with open(bundle.path / name, "rb") as f:
            yield os.fstat(f.fileno()).st_size, f
        return
    with tarfile.open(bundle.path) as tar:
        member = next((m for m in tar.getmembers() if m.isfile() and m.name.removeprefix("./") == name), None)
        data = tar.extractfile(member) if member is not None else None
        if member is None or data is None:
            raise FileNotFoundError(f"{bundle.path}: no {name} in the tarball any more")
        yield member.size, data


def digest(bundle: Bundle) -> str:
    """sha256 over the bundle's two files: a cache key for what carries them."""
    h = hashlib.sha256()
    for name in bundle.files:
        h.update(name.encode() + b"\0")
        with opened(bundle, name) as (size, data):
            h.update(size.to_bytes(8, "little"))
            while chunk := data.read(CHUNK):
                h.update(chunk)
    return h.hexdigest()


def place(bundle: Bundle, target: Path) -> dict[str, Path]:
    """The bundle's files in `target`: hard links (or copies) of a directory's, a tarball's extracted."""
    target.mkdir(parents=True, exist_ok=True)
    placed = {}
    for name in bundle.files:
        out = target / name
        if not bundle.tarball:
            try:
                os.link(bundle.path / name, out)
            except OSError:
                shutil.copyfile(bundle.path / name, out)
        else:
            with opened(bundle, name) as (_, data), open(out, "wb") as f:
                shutil.copyfileobj(data, f, CHUNK)
        out.chmod(0o755 if name == BINARY else 0o644)
        placed[name] = out
    return placed


def write_drive(bundle: Bundle, out: Path) -> Path:
    """An ISO 9660 image labelled CF-K3S with the bundle's files at its top (Rock Ridge names),
    for a QEMU machine to read as a read-only drive. Rebuilt only when the bundle changed."""
    import pycdlib  # factory only, and only here

    key = digest(bundle)
    stamp = out.with_name(out.name + ".hash")
    if out.exists() and stamp.exists() and stamp.read_text().strip() == key:
        return out
    stamp.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".k3s-bundle-", dir=out.parent) as scratch, atomic_path(out) as tmp:
        files = place(bundle, Path(scratch))
        iso = pycdlib.PyCdlib()
        iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=LABEL)
        for i, (name, path) in enumerate(sorted(files.items())):
            iso.add_file(str(path), f"/F{i}.;1", rr_name=name, joliet_path=f"/{name}",
                         file_mode=0o100755 if name == BINARY else 0o100644)
        iso.write(str(tmp))
        iso.close()
    stamp.write_text(key + "\n")
    return out
