"""A K3s air-gap bundle: the k3s binary and the images tarball, from K3s's release files.

K3s cannot be downloaded where clusterforge is developed, so it comes from the user as a
directory or a tarball holding `k3s` and `k3s-airgap-images-amd64.tar[.gz|.zst]`. It is
checked here, at validation, and travels beside the image (never inside it, never in a
seed). The version must be one whose datastore client works with Debian's etcd 3.4.
"""

from __future__ import annotations

import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .log import die, shorten
from .yamlsource import Field

BINARY = "k3s"
IMAGES = ("k3s-airgap-images-amd64.tar", "k3s-airgap-images-amd64.tar.gz", "k3s-airgap-images-amd64.tar.zst")
ELF_X86_64 = 0x3E
# K3s minor versions known to run on an external etcd 3.4 datastore (K3s certifies 3.5;
# its etcd client speaks the v3 API that 3.4 serves). Outside this range: refused.
SUPPORTED_MINORS = range(26, 32)
_VERSION = re.compile(rb"v1\.(\d+)\.(\d+)\+k3s(\d+)")
MAX_SHOWN = 100  # characters of a path in a message
SCAN_BYTES = 64 * 1024**2  # the version string sits in the binary's read-only data


@dataclass(frozen=True)
class Bundle:
    path: Path
    version: str
    images: str  # the images tarball's file name


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
        names = {p.name for p in path.iterdir()}
        images = next((name for name in IMAGES if name in names), None)
        if BINARY not in names or not (path / BINARY).is_file():
            at.fail(f"{shown}: no 'k3s' binary in the bundle", hint="copy k3s from K3s's release files into it")
        if images is None or not (path / images).is_file():
            at.fail(f"{shown}: no air-gap images in the bundle",
                    hint=f"add {IMAGES[0]} (or .gz/.zst) from K3s's release files")
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
            member = tar.extractfile(members[BINARY])
            assert member is not None
            version = _binary_version(member, at, f"{shown}:{BINARY}")
    except (tarfile.TarError, OSError) as exc:
        at.fail(f"{shown}: not a directory or a readable tarball ({shorten(str(exc), MAX_SHOWN)})")
    return Bundle(path, version, images)


def _binary_version(binary: IO[bytes], at: Field, where: str) -> str:
    head = binary.read(20)
    if head[:4] != b"\x7fELF" or len(head) < 20 or int.from_bytes(head[18:20], "little") != ELF_X86_64:
        at.fail(f"{where}: not an x86-64 ELF executable", hint="use the k3s binary (amd64) from K3s's release files")
    data = head + binary.read(SCAN_BYTES)
    match = _VERSION.search(data)
    if match is None:
        at.fail(f"{where}: no K3s version found in the binary")
    minor = int(match.group(1))
    version = match.group(0).decode()
    if minor not in SUPPORTED_MINORS:
        at.fail(f"{where}: K3s {version} is not supported",
                hint=f"use K3s v1.{SUPPORTED_MINORS.start} to v1.{SUPPORTED_MINORS.stop - 1}, which work with "
                     "etcd 3.4 as their datastore")
    return version


def require(path: Path) -> Bundle:
    """For commands that ship the bundle: check it again (it may have changed since validation)."""
    return check(path, Field(path, 0, "services.k3s_bundle")) if path.exists() else die(
        f"K3s bundle not found: {path}")
