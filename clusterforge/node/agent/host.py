"""What the agent reads and changes on its own machine: files and systemd units.

Every write is idempotent (nothing happens when the file already says it) and atomic (a
temporary file renamed into place), so a pass on a converged node changes nothing.
"""

from __future__ import annotations

import functools
import grp
import os
import pwd
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ...run import run


def read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def read_text(path: Path) -> str | None:
    data = read(path)
    return None if data is None else data.decode(errors="replace")


def file_is(path: Path, content: bytes | str, mode: int, owner: str = "root") -> bool:
    """The file holds exactly this, with this mode and owner."""
    data = content.encode() if isinstance(content, str) else content
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    uid, gid = ids(owner)
    return (st.st_mode & 0o7777) == mode and st.st_uid == uid and st.st_gid == gid and read(path) == data


def write(path: Path, content: bytes | str, mode: int = 0o644, owner: str = "root") -> None:
    """Write atomically with mode and owner set before the file appears."""
    data = content.encode() if isinstance(content, str) else content
    path.parent.mkdir(parents=True, exist_ok=True)
    uid, gid = ids(owner)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        os.fchown(fd, uid, gid)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_dir(path: Path, mode: int, owner: str = "root") -> None:
    path.mkdir(parents=True, exist_ok=True)
    uid, gid = ids(owner)
    os.chown(path, uid, gid)
    path.chmod(mode)


def dir_is(path: Path, mode: int, owner: str = "root") -> bool:
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    uid, gid = ids(owner)
    return path.is_dir() and (st.st_mode & 0o7777) == mode and (st.st_uid, st.st_gid) == (uid, gid)


def ids(owner: str) -> tuple[int, int]:
    """user or user:group -> (uid, gid)."""
    user, _, group = owner.partition(":")
    entry = pwd.getpwnam(user)
    return entry.pw_uid, grp.getgrnam(group).gr_gid if group else entry.pw_gid


@dataclass(frozen=True)
class Unit:
    name: str
    active: str  # active | inactive | failed | activating | deactivating
    sub: str
    enabled: str  # enabled | disabled | static | masked | "" (no such unit)
    result: str  # success | exit-code | ...
    since: str = ""  # ActiveEnterTimestampMonotonic, to tell restarts apart

    @property
    def running(self) -> bool:
        return self.active == "active"


def units(*names: str) -> dict[str, Unit]:
    """The state of several units in one systemctl call (each call costs a process)."""
    props = "Id,ActiveState,SubState,UnitFileState,Result,ActiveEnterTimestampMonotonic"
    out = run(["systemctl", "show", f"--property={props}", *names], check=False).stdout
    found: dict[str, Unit] = {}
    for block, name in zip(out.strip().split("\n\n"), names, strict=False):
        values = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        found[name] = Unit(name, values.get("ActiveState", ""), values.get("SubState", ""),
                           values.get("UnitFileState", ""), values.get("Result", ""),
                           values.get("ActiveEnterTimestampMonotonic", ""))
    for name in names:
        found.setdefault(name, Unit(name, "", "", "", ""))
    return found


def systemctl(*args: str) -> None:
    run(["systemctl", *args])


def daemon_reload() -> None:
    run(["systemctl", "daemon-reload"])


@functools.cache
def emulated() -> bool:
    """The machine is emulated in software (QEMU's TCG): ten to fifty times slower than metal.
    Under KVM or on metal, systemd-detect-virt says kvm or none."""
    return run(["systemd-detect-virt", "--vm"], check=False).stdout.strip() == "qemu"
