"""The one helper for running external commands.

argv lists only, never a shell. Verbose mode logs `+ cmd`. A missing binary
names the Debian package that provides it; a failure shows the command, its
exit code and the tail of its output.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .log import debug, die

# binary -> Debian package, for the "install it" hint.
PACKAGES = {
    "mmdebstrap": "mmdebstrap",
    "packer": "packer",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "xorriso": "xorriso",
    "mksquashfs": "squashfs-tools",
    "unsquashfs": "squashfs-tools",
    "dnsmasq": "dnsmasq",
    "cloud-init": "cloud-init",
    "sgdisk": "gdisk",
    "mkfs.ext4": "e2fsprogs",
    "mkfs.vfat": "dosfstools",
    "grub-install": "grub2-common",
    "grub-mkstandalone": "grub-common",
    "nginx": "nginx",
    "wg": "wireguard-tools",
    "etcd": "etcd-server",
    "ip": "iproute2",
}

TAIL_LINES = 25


def in_netns(netns: str | None, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
    """argv run inside the network namespace netns (as it is when netns is None)."""
    args = [os.fspath(a) for a in argv]
    return [which("ip"), "netns", "exec", netns, *args] if netns else args


def which(binary: str) -> str:
    path = shutil.which(binary, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        package = PACKAGES.get(binary, binary)
        die(f"command not found: {binary}", hint=f"install it with: apt-get install {package}")
    return path


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    input: bytes | str | None = None,
    capture: bool = True,
    check: bool = True,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv and return the completed process (text output).

    capture=True collects stdout and stderr separately; capture=False lets output go
    to the terminal (long builds show progress).
    env entries are added to the current environment.
    """
    args = [os.fspath(a) for a in argv]
    if "/" not in args[0]:
        args[0] = which(args[0])
    elif not Path(args[0]).exists():
        die(f"command not found: {args[0]}")
    debug("+ " + shlex.join([os.fspath(a) for a in argv]))
    full_env = None if env is None else {**os.environ, **env}
    if isinstance(input, bytes):
        input = input.decode()
    try:
        proc = subprocess.run(
            args,
            cwd=cwd,
            env=full_env,
            input=input,
            text=True,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else exc.output
        raise CommandError(args, None, out or "", f"timed out after {timeout}s") from None
    if check and proc.returncode != 0:
        raise CommandError(args, proc.returncode, (proc.stdout or "") + (proc.stderr or ""))
    return proc


def spawn(argv: Sequence[str | os.PathLike[str]], **popen: Any) -> subprocess.Popen[bytes]:
    """Start a long-running command (a server) the way run() would run a short one."""
    args = [os.fspath(a) for a in argv]
    if "/" not in args[0]:
        args[0] = which(args[0])
    debug("+ " + shlex.join(args) + " &")
    return subprocess.Popen(args, **popen)


class CommandError(Exception):
    """An external command failed: names it, its exit code and the tail of its output."""

    def __init__(self, argv: list[str], code: int | None, output: str, why: str = ""):
        self.argv = argv
        self.code = code
        self.output = output
        tail = "\n".join(output.rstrip().splitlines()[-TAIL_LINES:])
        status = why or f"exit code {code}"
        super().__init__(
            f"command failed ({status}): {shlex.join(argv)}" + (f"\n{tail}" if tail else "")
        )
